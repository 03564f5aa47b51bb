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

use fjall::{KeyspaceCreateOptions, PersistMode, Readable};

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
}

/// A fjall keyspace.
#[derive(Clone)]
pub(crate) struct FjallTree {
    ks: fjall::Keyspace,
}

/// A fjall write batch.
pub(crate) struct FjallBatch {
    batch: fjall::OwnedWriteBatch,
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
        }
    }

    fn snapshot(&self) -> FjallSnapshot {
        FjallSnapshot {
            snap: self.db.snapshot(),
        }
    }

    fn persist(&self, how: Persist) -> Result<(), StoreError> {
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
        self.batch.insert(&tree.ks, key, value);
    }

    #[inline]
    fn remove(&mut self, tree: &FjallTree, key: &[u8]) {
        self.batch.remove(&tree.ks, key);
    }

    fn commit(self) -> Result<(), StoreError> {
        self.batch.commit().map_err(err)
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
    use super::default_workers;

    #[test]
    fn a_small_machine_gets_a_third_worker_and_a_large_one_at_most_four() {
        // Two workers on two cores is the case that spins; one would starve flushes.
        assert_eq!(default_workers(1), 3);
        assert_eq!(default_workers(2), 3);
        assert_eq!(default_workers(4), 4);
        assert_eq!(default_workers(64), 4);
    }
}
