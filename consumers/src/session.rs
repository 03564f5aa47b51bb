//! Client sessions for requests and read fences: a connection made on first use and made
//! again after a network error, each idempotent request retried once.
//!
//! Owns: [`Session`]. Must never retry a request that is not idempotent.

use std::sync::Arc;
use std::time::Duration;

use tideline_stream::{Client, ClientConfig, ClientError};
use tideline_wal::GtidSet;

/// A client session that reconnects on demand, for requests and read fences.
#[derive(Debug)]
pub struct Session {
    addr: String,
    cfg: ClientConfig,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
}

impl Session {
    /// A session with `addr`; connects on first use.
    pub fn new(addr: impl Into<String>, cfg: ClientConfig) -> Self {
        Session {
            addr: addr.into(),
            cfg,
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// The current connection, connecting (again) if needed.
    pub async fn client(&self) -> Result<Arc<Client>, ClientError> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = Arc::new(Client::connect(&self.addr, self.cfg.clone()).await?);
        *guard = Some(c.clone());
        Ok(c)
    }

    async fn forget(&self) {
        *self.client.lock().await = None;
    }

    /// A read fence: resolves once the node has applied and made durable every GTID of
    /// `gtids` (returns `true`), or at `timeout` (returns `false`). Retries once on a broken
    /// connection (waiting is idempotent).
    pub async fn wait_for(&self, gtids: &GtidSet, timeout: Duration) -> Result<bool, ClientError> {
        for attempt in 0..2 {
            let c = self.client().await?;
            match c.wait_for(gtids, timeout).await {
                Ok((reached, _)) => return Ok(reached),
                Err(e) if e.is_retryable() && attempt == 0 => self.forget().await,
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// The documents secondary index `index` of `tree` maps `values` to (one per indexed
    /// path, or fewer for a composite index), as (key, value) pairs in index order, read from
    /// one snapshot of the node. Only the first page: at most 1 MiB of documents, and nothing
    /// says whether more matched. To read every match, call [`Client::index_query`] (from
    /// [`Session::client`]) and pass each page's `next` as the next query's `after`, until
    /// `next` is `None`.
    /// With `after`, the node first waits until it has applied that GTID set and the index is
    /// live, so a write acknowledged anywhere (e.g. the primary) is seen on a replica: the
    /// fence fails with [`ErrorCode::Unavailable`](tideline_stream::ErrorCode) after
    /// `timeout`. Retries once on a broken connection (reads are idempotent).
    pub async fn index_get(
        &self,
        tree: &str,
        index: &str,
        values: &[Vec<u8>],
        after: Option<&GtidSet>,
        timeout: Duration,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, ClientError> {
        let query = tideline_stream::IndexQuery {
            tree: tree.into(),
            index: index.into(),
            values: values.to_vec(),
            prefix: Vec::new(),
            after: None,
            limit: u64::MAX,
            bytes_max: tideline_stream::SCAN_PAGE_BYTES_MAX,
            fence: after.map(GtidSet::to_string),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        for attempt in 0..2 {
            let c = self.client().await?;
            match c.index_query(query.clone()).await {
                Ok(p) => return Ok(p.rows),
                Err(e) if e.is_retryable() && attempt == 0 => self.forget().await,
                Err(e) => return Err(e),
            }
        }
        Ok(Vec::new())
    }

    /// Reads one key, retrying once on a broken connection (reads are idempotent).
    pub async fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        for attempt in 0..2 {
            let c = self.client().await?;
            match c.get(tree, key).await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && attempt == 0 => self.forget().await,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}
