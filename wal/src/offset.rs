//! Local log positions.

use std::fmt;
use std::num::NonZeroU64;
use std::str::FromStr;

/// A position in this node's log: dense from 1, one per transaction.
///
/// persisted: changes must stay backward compatible (written in frame and segment headers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset(NonZeroU64);

impl Offset {
    /// The first offset of every log.
    pub const FIRST: Offset = Offset(NonZeroU64::MIN);

    /// `None` for 0, which is not an offset.
    pub const fn new(n: u64) -> Option<Offset> {
        match NonZeroU64::new(n) {
            Some(n) => Some(Offset(n)),
            None => None,
        }
    }

    /// The number.
    pub const fn get(self) -> u64 {
        self.0.get()
    }

    /// The next offset.
    pub fn next(self) -> Offset {
        Offset(self.0.saturating_add(1))
    }

    /// The previous offset, or `None` before the first.
    pub fn prev(self) -> Option<Offset> {
        Offset::new(self.get() - 1)
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Offset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .parse::<u64>()
            .ok()
            .and_then(Offset::new)
            .ok_or_else(|| format!("`{s}` is not an offset: offsets are whole numbers from 1"))
    }
}

/// Which history of a node's log a position belongs to. A log starts in
/// [`Epoch::INITIAL`]; every [`crate::Wal::reset_history`] (a bootstrap replacing the node's
/// state) moves it to a new random epoch. Offsets are only comparable within one
/// (`server_uuid`, epoch): the same offset in two epochs names different transactions.
///
/// persisted: changes must stay backward compatible (segment headers, wire messages,
/// checkpoints).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(u64);

impl Epoch {
    /// The epoch of a log that was never reset (and of every log written before epochs were
    /// recorded, segment format 1).
    pub const INITIAL: Epoch = Epoch(0);

    /// The epoch with this number.
    pub const fn new(n: u64) -> Epoch {
        Epoch(n)
    }

    /// The number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// A fresh epoch for a new history: random, so that a data directory restored from a
    /// backup and reset again does not reuse an epoch a downstream has seen. Never `INITIAL`.
    pub fn fresh() -> Epoch {
        let bytes = uuid::Uuid::new_v4().into_bytes();
        let mut n = [0u8; 8];
        n.copy_from_slice(&bytes[..8]);
        Epoch(u64::from_le_bytes(n).max(1))
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
