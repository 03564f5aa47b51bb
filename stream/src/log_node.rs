//! A node that is only a log: commits append to it, reads come from an in-memory map of the
//! writes this process made. For tests and benchmarks of the transport without an engine,
//! and as the smallest example of implementing [`Node`].

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tideline_wal::{Gtid, GtidSet, NewTransaction, Offset, Op, Wal};

use crate::proto::{ErrorCode, WriteOp};
use crate::server::{Node, NodeError, Page, ScanPage, collect_page};

type Kv = BTreeMap<(String, Vec<u8>), Vec<u8>>;

/// See the module documentation.
pub struct LogNode {
    wal: Wal,
    next_seq: Mutex<u64>,
    kv: Mutex<Kv>,
}

impl LogNode {
    /// A node over `wal`; its key-value state starts empty (it is not rebuilt from the log).
    pub fn new(wal: Wal) -> Self {
        let next = wal.gtids().last_seq(&wal.server_uuid()).unwrap_or(0) + 1;
        LogNode {
            wal,
            next_seq: Mutex::new(next),
            kv: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Node for LogNode {
    fn wal(&self) -> &Wal {
        &self.wal
    }
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, NodeError> {
        Ok(self
            .kv
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(tree.to_string(), key.to_vec()))
            .cloned())
    }
    fn scan(&self, tree: &str, prefix: &[u8], page: ScanPage<'_>) -> Result<Page, NodeError> {
        let kv = self.kv.lock().unwrap_or_else(|p| p.into_inner());
        let rows = kv
            .iter()
            .filter(|((t, k), _)| {
                t == tree && k.starts_with(prefix) && page.after.is_none_or(|a| k.as_slice() > a)
            })
            .map(|((_, k), v)| Ok::<_, NodeError>((k.clone(), v.clone())));
        collect_page(rows, page)
    }
    async fn commit(&self, ops: Vec<WriteOp>) -> Result<(Offset, Gtid), NodeError> {
        let ops: Vec<Op> = ops
            .into_iter()
            .map(|op| match op {
                WriteOp::Put { tree, key, value } => Op::Put {
                    tree,
                    key,
                    value,
                    before: None,
                },
                WriteOp::Delete { tree, key } => Op::Delete {
                    tree,
                    key,
                    before: None,
                },
                WriteOp::Merge { tree, key, operand } => Op::Merge { tree, key, operand },
                WriteOp::CreateIndex {
                    tree,
                    name,
                    paths,
                    unique,
                } => Op::CreateIndex {
                    tree,
                    name,
                    paths,
                    unique,
                },
                WriteOp::DropIndex { tree, name } => Op::DropIndex { tree, name },
            })
            .collect();
        let (pending, gtid) = {
            let mut seq = self.next_seq.lock().unwrap_or_else(|p| p.into_inner());
            let gtid = Gtid::new(self.wal.server_uuid(), *seq)
                .map_err(|e| NodeError::new(ErrorCode::Internal, e.to_string()))?;
            let p = self
                .wal
                .submit(NewTransaction {
                    gtid,
                    timestamp_us: 0,
                    ops: ops.clone(),
                })
                .map_err(|e| NodeError::new(ErrorCode::Unavailable, e.to_string()))?;
            *seq += 1;
            (p, gtid)
        };
        let offset = pending
            .await
            .map_err(|e| NodeError::new(ErrorCode::Unavailable, e.to_string()))?;
        let mut kv = self.kv.lock().unwrap_or_else(|p| p.into_inner());
        for op in ops {
            if let Op::Put {
                tree, key, value, ..
            } = op
            {
                kv.insert((tree, key), value);
            }
        }
        Ok((offset, gtid))
    }

    fn status_json(&self) -> String {
        format!(r#"{{"last_offset":{}}}"#, self.wal.visible_offset())
    }
    async fn wait_for(&self, gtids: GtidSet, timeout: Duration) -> (bool, GtidSet) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // The head before the GTIDs: a record made visible after this read wakes the wait.
            let head = self.wal.visible_offset();
            let have = self.wal.gtids();
            if gtids.is_subset(&have) || tokio::time::Instant::now() >= deadline {
                return (gtids.is_subset(&have), have);
            }
            let Some(next) = Offset::new(head + 1) else {
                return (false, have);
            };
            tokio::select! {
                r = self.wal.wait_visible(next) => {
                    if r.is_err() {
                        // Poisoned or closed: nothing more becomes visible.
                        return (false, self.wal.gtids());
                    }
                }
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
}
