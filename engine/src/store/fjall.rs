//! [`Store`] on [fjall] 3, an LSM tree: one fjall keyspace per tree, fjall's atomic
//! cross-keyspace `OwnedWriteBatch`, its MVCC snapshots and its bulk ingestion. The journal
//! is persisted by hand (`manual_journal_persist`): the engine's log covers unsynced batches.
//!
//! Why fjall: a trial on this machine kind (1 M random 16-byte keys, 100-byte values, 1,000
//! commits) found fjall 3 applying 2.5-6x faster than redb 4, with bounded disk use and
//! lower memory; redb scanned ~3x faster. The engine's workload is write-heavy (every commit
//! is applied), so the apply rate decided it (see `docs/DEPENDENCIES.md`).
//!
//! [fjall]: https://docs.rs/fjall/3

use std::path::Path;

use fjall::{AbstractTree, KeyspaceCreateOptions, PersistMode, Readable};

use super::{
    Ingest, KvPair, OwnedBounds, Persist, Store, StoreError, StoreOptions, StoreSnapshot,
    StoreStats, StoreTree, TreeOptions, WriteBatch,
};

fn err(e: fjall::Error) -> StoreError {
    StoreError::new(e)
}

/// A fjall database.
pub(crate) struct FjallStore {
    db: fjall::Database,
    /// Test-only faults (cargo feature `testing`).
    #[cfg(feature = "testing")]
    faults: Option<std::sync::Arc<super::StoreFaults>>,
}

/// A fjall keyspace.
#[derive(Clone)]
pub(crate) struct FjallTree {
    ks: fjall::Keyspace,
}

/// A fjall write batch that hands its writes to fjall sorted by tree and key.
///
/// fjall inserts a batch's writes into each tree's memtable (a skiplist) one by one, in the
/// order it was given them. In key order, each insert's search walks nearly the same path as
/// the one before, still in cache; in the log's order (random keys, for most workloads) each
/// one misses the cache at almost every level. So the batch keeps its writes in one buffer
/// and sorts them at commit: 17% less CPU for the engine bench's upstream apply, 20% less on
/// the applier and 25% less in fjall's flushes (`docs/benchmarks.md`, "Memtable inserts in
/// key order").
///
/// The sort is stable for writes to the same key (ties keep the order they were made in), so
/// a key written twice in one batch ends as it did before. The copy costs one buffer per
/// batch; past [`HELD_BYTES_MAX`] the writes held so far are handed over (sorted) early, and
/// a single write larger than that goes to fjall at once, so a batch of large values holds at
/// most that much twice.
pub(crate) struct FjallBatch {
    batch: fjall::OwnedWriteBatch,
    /// The database, asked whether it is poisoned while it stalls writes.
    db: fjall::Database,
    /// The trees written, in the order first written; `Held::tree` indexes this.
    trees: Vec<fjall::Keyspace>,
    /// Every held write's key, then its value (none for a removal).
    bytes: Vec<u8>,
    held: Vec<Held>,
    /// Test-only faults (cargo feature `testing`).
    #[cfg(feature = "testing")]
    faults: Option<std::sync::Arc<super::StoreFaults>>,
}

/// Bytes of keys and values a batch holds before it hands them to fjall (sorted so far).
const HELD_BYTES_MAX: usize = 32 << 20;

/// fjall 3.1 halts a committing writer (sleeps, after the batch's writes are visible, checking
/// no poison) while a keyspace it wrote has this many sealed memtables waiting for a flush
/// (`Keyspace::local_backpressure`)...
const FJALL_HALT_SEALED_MEMTABLES: usize = 4;
/// ...or this many runs in level 0 waiting for a compaction (`check_write_halt`).
const FJALL_HALT_L0_RUNS: usize = 30;

/// [`WriteBatch::write_stall`] reports a stall below fjall's halt by what can happen between
/// the report and fjall's own check after the commit: each tree's memtable is rotated at most
/// twice (its active memtable holds writes from before the report, then this batch's), and
/// each sealed memtable becomes one level-0 run when flushed (at most the one sealed at the
/// report and the two sealed since). So a batch committed when no stall is reported never
/// halts in fjall.
const STALL_SEALED_MEMTABLES: usize = FJALL_HALT_SEALED_MEMTABLES - 2;
const STALL_L0_RUNS: usize = FJALL_HALT_L0_RUNS - 3;

/// A write held until commit: its key and value as ranges of `FjallBatch::bytes`.
struct Held {
    tree: u32,
    /// Start of the key in `bytes`; also the write's place in the order writes were made.
    at: u32,
    key_len: u32,
    /// `None`: a removal.
    value_len: Option<u32>,
}

impl FjallBatch {
    fn hold(&mut self, tree: &FjallTree, key: &[u8], value: Option<&[u8]>) {
        let id = tree.ks.id();
        let t = match self.trees.iter().position(|k| k.id() == id) {
            Some(t) => t,
            None => {
                self.trees.push(tree.ks.clone());
                self.trees.len() - 1
            }
        };
        let size = key.len() + value.map_or(0, <[u8]>::len);
        if self.bytes.len() + size > HELD_BYTES_MAX {
            self.hand_over();
            if size > HELD_BYTES_MAX {
                // Nothing to gain from sorting a write this large: it goes to fjall at once,
                // after every write made before it.
                match value {
                    Some(v) => self.batch.insert(&tree.ks, key, v),
                    None => self.batch.remove(&tree.ks, key),
                }
                return;
            }
        }
        // `bytes` never holds more than HELD_BYTES_MAX: every offset and length fits in u32.
        let at = self.bytes.len() as u32;
        self.bytes.extend_from_slice(key);
        if let Some(v) = value {
            self.bytes.extend_from_slice(v);
        }
        self.held.push(Held {
            tree: t as u32,
            at,
            key_len: key.len() as u32,
            value_len: value.map(|v| v.len() as u32),
        });
    }

    /// Gives fjall the held writes, sorted by tree, key and the order they were made in.
    fn hand_over(&mut self) {
        let bytes = &self.bytes;
        let key = |h: &Held| &bytes[h.at as usize..(h.at + h.key_len) as usize];
        self.held.sort_unstable_by(|a, b| {
            a.tree
                .cmp(&b.tree)
                .then_with(|| key(a).cmp(key(b)))
                .then(a.at.cmp(&b.at))
        });
        for h in &self.held {
            let ks = &self.trees[h.tree as usize];
            match h.value_len {
                Some(len) => {
                    let v = (h.at + h.key_len) as usize;
                    self.batch.insert(ks, key(h), &bytes[v..v + len as usize]);
                }
                None => self.batch.remove(ks, key(h)),
            }
        }
        self.held.clear();
        self.bytes.clear();
    }
}

/// A fjall snapshot.
#[derive(Clone)]
pub(crate) struct FjallSnapshot {
    snap: fjall::Snapshot,
}

/// A fjall scan, yielding owned pairs.
pub(crate) struct FjallIter {
    iter: fjall::Iter,
}

/// A fjall scan, yielding owned keys.
pub(crate) struct FjallKeys {
    iter: fjall::Iter,
}

/// The store's background workers (flushes, compactions) when the engine leaves the choice to
/// the store: one per core, at least 3 and at most 4.
///
/// fjall's own default is one per core up to 4, and two workers spin on a 2-core machine:
/// worker 0 keeps flushes first by handing every compaction request back to the shared queue,
/// then takes it again at once while the other worker is busy. Under a steady write load that
/// loop was ~8% of all CPU samples (`perf record` of the engine bench's upstream apply, in
/// `docs/benchmarks.md`). With a third worker an idle one takes the request. One worker would
/// not spin, but it rotates and flushes memtables only between compactions, so memtables
/// grew to 257 MiB while loading 10 M keys.
fn default_workers(cores: usize) -> usize {
    cores.clamp(3, 4)
}

fn create_options(opts: &TreeOptions) -> KeyspaceCreateOptions {
    let o = KeyspaceCreateOptions::default();
    match opts.memtable_bytes {
        Some(b) => o.max_memtable_size(b),
        None => o,
    }
}

impl Store for FjallStore {
    type Tree = FjallTree;
    type Batch = FjallBatch;
    type Snapshot = FjallSnapshot;
    type Iter = FjallIter;

    fn open(path: &Path, opts: &StoreOptions) -> Result<Self, StoreError> {
        let workers = match opts.worker_threads {
            0 => default_workers(
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            ),
            n => n,
        };
        let builder = fjall::Database::builder(path)
            .cache_size(opts.cache_bytes)
            .manual_journal_persist(true)
            .worker_threads(workers);
        Ok(FjallStore {
            db: builder.open().map_err(err)?,
            #[cfg(feature = "testing")]
            faults: opts.faults.clone(),
        })
    }

    fn tree(&self, name: &str, opts: &TreeOptions) -> Result<FjallTree, StoreError> {
        let ks = self
            .db
            .keyspace(name, || create_options(opts))
            .map_err(err)?;
        Ok(FjallTree { ks })
    }

    fn tree_exists(&self, name: &str) -> bool {
        self.db.keyspace_exists(name)
    }

    fn tree_names(&self) -> Vec<String> {
        self.db
            .list_keyspace_names()
            .iter()
            .map(|n| {
                let s: &str = n;
                s.to_string()
            })
            .collect()
    }

    fn delete_tree(&self, tree: FjallTree) -> Result<(), StoreError> {
        self.db.delete_keyspace(tree.ks).map_err(err)
    }

    fn batch(&self) -> FjallBatch {
        FjallBatch {
            batch: self.db.batch(),
            db: self.db.clone(),
            trees: Vec::new(),
            bytes: Vec::new(),
            held: Vec::new(),
            #[cfg(feature = "testing")]
            faults: self.faults.clone(),
        }
    }

    fn snapshot(&self) -> FjallSnapshot {
        FjallSnapshot {
            snap: self.db.snapshot(),
        }
    }

    fn persist(&self, how: Persist) -> Result<(), StoreError> {
        #[cfg(feature = "testing")]
        if let Some(f) = &self.faults {
            match how {
                Persist::Buffer => f.check_poisoned()?,
                Persist::Sync => f.sync()?,
            }
        }
        let mode = match how {
            Persist::Buffer => PersistMode::Buffer,
            Persist::Sync => PersistMode::SyncAll,
        };
        self.db.persist(mode).map_err(err)
    }

    fn stats(&self) -> StoreStats {
        let db = &self.db;
        StoreStats {
            disk_bytes: db.disk_space().unwrap_or(0),
            journal_count: db.journal_count(),
            outstanding_flushes: db.outstanding_flushes(),
            active_compactions: db.active_compactions(),
            cache_bytes_max: db.cache_capacity(),
            cache_bytes: db.cache_size(),
            write_buffer_bytes: db.write_buffer_size(),
        }
    }
}

impl StoreTree for FjallTree {
    type Value = fjall::Slice;
    type Iter = FjallIter;
    type Keys = FjallKeys;

    fn name(&self) -> &str {
        self.ks.name()
    }

    fn id(&self) -> u64 {
        self.ks.id()
    }

    #[inline]
    fn get(&self, key: &[u8]) -> Result<Option<fjall::Slice>, StoreError> {
        self.ks.get(key).map_err(err)
    }

    fn range(&self, bounds: OwnedBounds) -> FjallIter {
        FjallIter {
            iter: self.ks.range(bounds),
        }
    }

    fn prefix(&self, prefix: &[u8]) -> FjallIter {
        FjallIter {
            iter: self.ks.prefix(prefix),
        }
    }

    fn keys(&self, from: &[u8], to: Option<&[u8]>) -> FjallKeys {
        let iter = match to {
            Some(to) => self.ks.range(from..to),
            None => self.ks.range(from..),
        };
        FjallKeys { iter }
    }

    fn approximate_len(&self) -> u64 {
        u64::try_from(self.ks.approximate_len()).unwrap_or(u64::MAX)
    }

    /// fjall flushes the keyspace's memtable first and gives the new tables one sequence
    /// number above every earlier write, as the newest L0 run.
    fn ingest<'a>(
        &self,
        entries: impl Iterator<Item = Result<Ingest<'a>, StoreError>>,
    ) -> Result<(), StoreError> {
        let mut ingestion = self.ks.start_ingestion().map_err(err)?;
        for e in entries {
            match e? {
                Ingest::Put(k, v) => ingestion.write(k, v).map_err(err)?,
                Ingest::Tombstone(k) => ingestion.write_tombstone(k).map_err(err)?,
            }
        }
        ingestion.finish().map_err(err)
    }
}

impl WriteBatch for FjallBatch {
    type Tree = FjallTree;

    #[inline]
    fn insert(&mut self, tree: &FjallTree, key: &[u8], value: &[u8]) {
        self.hold(tree, key, Some(value));
    }

    #[inline]
    fn remove(&mut self, tree: &FjallTree, key: &[u8]) {
        self.hold(tree, key, None);
    }

    /// A tree past [`STALL_SEALED_MEMTABLES`] or [`STALL_L0_RUNS`]. While stalled, asks
    /// whether the database is poisoned (a failed flush poisons it and ends that flush worker:
    /// the stall would never end) by handing the journal's buffer to the OS, which fails on a
    /// poisoned database and costs nothing when the buffer is empty.
    fn write_stall(&self) -> Result<bool, StoreError> {
        #[cfg(feature = "testing")]
        if let Some(f) = &self.faults {
            f.check_poisoned()?;
            if f.reports_stall() {
                return Ok(true);
            }
        }
        let stalled = self.trees.iter().any(|ks| {
            ks.sealed_memtable_count() >= STALL_SEALED_MEMTABLES
                || ks.tree.l0_run_count() >= STALL_L0_RUNS
        });
        if stalled {
            self.db.persist(PersistMode::Buffer).map_err(err)?;
        }
        Ok(stalled)
    }

    fn commit(mut self) -> Result<(), StoreError> {
        #[cfg(feature = "testing")]
        if let Some(f) = &self.faults {
            f.check_poisoned()?;
        }
        self.hand_over();
        self.batch.commit().map_err(err)?;
        // fjall's backpressure runs here too, once the writes are visible.
        #[cfg(feature = "testing")]
        if let Some(f) = &self.faults {
            f.wait_in_commit();
        }
        Ok(())
    }
}

impl StoreSnapshot for FjallSnapshot {
    type Tree = FjallTree;
    type Iter = FjallIter;

    #[inline]
    fn get(&self, tree: &FjallTree, key: &[u8]) -> Result<Option<fjall::Slice>, StoreError> {
        self.snap.get(&tree.ks, key).map_err(err)
    }

    fn range(&self, tree: &FjallTree, bounds: OwnedBounds) -> FjallIter {
        FjallIter {
            iter: self.snap.range(&tree.ks, bounds),
        }
    }

    fn visit_range(
        &self,
        tree: &FjallTree,
        bounds: OwnedBounds,
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        for g in self.snap.range(&tree.ks, bounds) {
            let (k, v) = g.into_inner().map_err(err)?;
            if !f(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    fn prefix(&self, tree: &FjallTree, prefix: &[u8]) -> FjallIter {
        FjallIter {
            iter: self.snap.prefix(&tree.ks, prefix),
        }
    }
}

fn pair(g: fjall::Guard) -> Result<KvPair, StoreError> {
    g.into_inner()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .map_err(err)
}

impl Iterator for FjallIter {
    type Item = Result<KvPair, StoreError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.iter.next().map(pair)
    }
}

impl DoubleEndedIterator for FjallIter {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.iter.next_back().map(pair)
    }
}

impl Iterator for FjallKeys {
    type Item = Result<Vec<u8>, StoreError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.iter
            .next()
            .map(|g| g.key().map(|k| k.to_vec()).map_err(err))
    }
}

#[cfg(test)]
mod tests {
    use super::{
        FJALL_HALT_SEALED_MEMTABLES, FjallStore, HELD_BYTES_MAX, STALL_SEALED_MEMTABLES,
        default_workers,
    };
    use crate::store::{Store, StoreOptions, StoreTree, TreeOptions, WriteBatch};

    fn store(dir: &std::path::Path) -> FjallStore {
        FjallStore::open(
            dir,
            &StoreOptions {
                cache_bytes: 8 << 20,
                worker_threads: 0,
                #[cfg(feature = "testing")]
                faults: None,
            },
        )
        .expect("open the store")
    }

    fn read(t: &super::FjallTree, key: &[u8]) -> Option<Vec<u8>> {
        t.get(key).expect("read").map(|v| v.to_vec())
    }

    #[test]
    fn a_batch_sorted_at_commit_keeps_the_last_write_of_each_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = store(dir.path());
        let a = db.tree("a", &TreeOptions::default()).expect("tree a");
        let b = db.tree("b", &TreeOptions::default()).expect("tree b");
        let mut batch = db.batch();
        // Out of key order, across two trees, with keys written more than once: the sort
        // must keep each key's writes in the order they were made.
        batch.insert(&a, b"m", b"1");
        batch.insert(&b, b"m", b"b1");
        batch.insert(&a, b"c", b"1");
        batch.remove(&a, b"m");
        batch.insert(&a, b"z", b"1");
        batch.insert(&a, b"c", b"2");
        batch.remove(&b, b"x");
        batch.insert(&b, b"x", b"b2");
        batch.insert(&a, b"c", b"3");
        // Many writes to few keys, interleaved: enough for an unstable sort to reorder ties.
        let mut last = std::collections::BTreeMap::new();
        let mut x = 12345u32;
        for n in 0..5000u32 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let key = [b'r', (x >> 16) as u8 % 16];
            if (x >> 8).is_multiple_of(5) {
                batch.remove(&b, &key);
                last.insert(key, None);
            } else {
                batch.insert(&b, &key, &n.to_be_bytes());
                last.insert(key, Some(n.to_be_bytes().to_vec()));
            }
        }
        batch.commit().expect("commit");
        for (key, want) in &last {
            assert_eq!(&read(&b, key), want, "key {key:?}: not its last write");
        }
        assert_eq!(read(&a, b"c").as_deref(), Some(&b"3"[..]));
        assert_eq!(
            read(&a, b"m"),
            None,
            "a removal after a put stays a removal"
        );
        assert_eq!(read(&a, b"z").as_deref(), Some(&b"1"[..]));
        assert_eq!(read(&b, b"m").as_deref(), Some(&b"b1"[..]));
        assert_eq!(
            read(&b, b"x").as_deref(),
            Some(&b"b2"[..]),
            "a put after a removal"
        );
    }

    #[test]
    fn a_batch_past_its_held_bytes_hands_writes_over_early_in_their_order() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = store(dir.path());
        let t = db.tree("t", &TreeOptions::default()).expect("tree");
        let big = vec![7u8; HELD_BYTES_MAX / 3];
        let mut batch = db.batch();
        // "k" is written in the first hand-over, then again after the held bytes passed the
        // limit: the later write must win.
        batch.insert(&t, b"k", b"first");
        for i in 0..4u8 {
            batch.insert(&t, &[b'v', i], &big);
        }
        batch.insert(&t, b"k", b"second");
        batch.remove(&t, &[b'v', 0]);
        // A write larger than the limit goes to fjall at once, between the writes around it.
        batch.insert(&t, b"h", b"held");
        batch.insert(&t, b"h", &vec![1u8; HELD_BYTES_MAX + 1]);
        batch.insert(&t, b"k", b"third");
        batch.commit().expect("commit");
        assert_eq!(read(&t, b"k").as_deref(), Some(&b"third"[..]));
        assert_eq!(read(&t, b"h").map(|v| v.len()), Some(HELD_BYTES_MAX + 1));
        assert_eq!(read(&t, &[b'v', 0]), None);
        assert_eq!(read(&t, &[b'v', 3]).map(|v| v.len()), Some(big.len()));
    }

    #[test]
    fn a_batch_reports_a_stall_while_a_tree_it_writes_has_memtables_waiting_for_a_flush() {
        let dir = tempfile::tempdir().expect("temp dir");
        // No background workers: sealed memtables stay sealed, as when flushes fall behind.
        let db = FjallStore {
            db: fjall::Database::builder(dir.path())
                .worker_threads_unchecked(0)
                .open()
                .expect("open the store"),
            #[cfg(feature = "testing")]
            faults: None,
        };
        let t = db.tree("t", &TreeOptions::default()).expect("tree t");
        let u = db.tree("u", &TreeOptions::default()).expect("tree u");
        let stalled = |tree: &super::FjallTree| {
            let mut batch = db.batch();
            batch.insert(tree, b"k", b"v");
            batch.write_stall().expect("the store is not poisoned")
        };
        for sealed in 0..STALL_SEALED_MEMTABLES {
            assert!(!stalled(&t), "{sealed} sealed memtables: no stall yet");
            let mut batch = db.batch();
            batch.insert(&t, b"k", &sealed.to_be_bytes());
            batch.commit().expect("commit");
            assert!(t.ks.rotate_memtable().expect("rotate"), "sealed a memtable");
        }
        assert_eq!(t.ks.sealed_memtable_count(), STALL_SEALED_MEMTABLES);
        assert!(
            stalled(&t),
            "a commit now could reach fjall's halt ({FJALL_HALT_SEALED_MEMTABLES} sealed) \
             before a flush"
        );
        assert!(!stalled(&u), "another tree's writes are not stalled");
        let mut both = db.batch();
        both.insert(&u, b"k", b"v");
        both.insert(&t, b"k", b"v");
        assert!(
            both.write_stall().expect("not poisoned"),
            "a batch writing both"
        );
    }

    #[test]
    fn a_small_machine_gets_a_third_worker_and_a_large_one_at_most_four() {
        // Two workers on two cores is the case that spins; one would starve flushes.
        assert_eq!(default_workers(1), 3);
        assert_eq!(default_workers(2), 3);
        assert_eq!(default_workers(4), 4);
        assert_eq!(default_workers(64), 4);
    }
}
