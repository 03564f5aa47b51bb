//! Positions in a node's log as a consumer names them: where a tail starts ([`TailStart`]) and
//! where a consumer is ([`Position`], what a checkpoint stores), and how one becomes the other
//! on a given node.
//!
//! Owns: the two types and their conversions (to the wire's `Start`, and from a position to a
//! start on the same or another node). Must never do I/O, hold a connection, or know how a
//! position is stored: the tail and the checkpoints build on this module, never the reverse.

use tideline_stream::Start;
use tideline_wal::{Epoch, GtidSet};
use uuid::Uuid;

/// Where a tail starts when it has no checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailStart {
    /// The oldest transaction the node still holds.
    Earliest,
    /// The first transaction committed after the subscription is in place.
    Latest,
    /// A local offset of the node.
    Offset(u64),
    /// Everything whose GTID is not in the set.
    Gtid(GtidSet),
}

impl TailStart {
    /// The wire form of this start.
    pub(crate) fn to_wire(&self) -> Start {
        match self {
            TailStart::Earliest => Start::Earliest,
            TailStart::Latest => Start::Latest,
            TailStart::Offset(n) => Start::Offset(*n),
            TailStart::Gtid(set) => Start::Gtid(set.to_string()),
        }
    }
}

/// A consumer's position: the last transaction delivered, both as a local offset of the node
/// it came from and as the set of GTIDs delivered so far.
///
/// persisted: changes must stay backward compatible (checkpoint files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The node whose offsets `offset` counts.
    pub server_uuid: Uuid,
    /// Last offset delivered on that node.
    pub offset: u64,
    /// Every GTID delivered (or known at the start).
    pub gtids: GtidSet,
    /// The node's history epoch `offset` belongs to; `None` when unknown (a checkpoint
    /// written before epochs were recorded), which resumes by GTID set.
    pub epoch: Option<Epoch>,
}

impl Position {
    /// Where to resume on node `server_uuid`: by offset on the same node, by GTID set on any
    /// other (auto-positioning, no offset arithmetic across nodes). A resume by offset still
    /// needs the node's history epoch to match (see [`Position::offset_valid_in`]). A damaged
    /// position at the largest offset resumes there, past any log, and the node refuses it as
    /// unavailable: the offset never wraps round to 0.
    pub fn resume_on(&self, server_uuid: Uuid) -> TailStart {
        if server_uuid == self.server_uuid && self.epoch.is_some() {
            TailStart::Offset(self.offset.saturating_add(1))
        } else {
            TailStart::Gtid(self.gtids.clone())
        }
    }

    /// Whether `offset` names the same place on node `server_uuid` in history `epoch`: the
    /// same node, and its history was not replaced since (a bootstrap of that node).
    pub fn offset_valid_in(&self, server_uuid: Uuid, epoch: Epoch) -> bool {
        server_uuid == self.server_uuid && self.epoch == Some(epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A damaged checkpoint holding the largest offset resumes at an offset no log can reach,
    /// which the node refuses as unavailable: never a panic, and never a wrap to offset 0.
    #[test]
    fn a_checkpoint_at_the_largest_offset_resumes_past_every_log_instead_of_wrapping() {
        let uuid = Uuid::from_u128(7);
        let pos = Position {
            server_uuid: uuid,
            offset: u64::MAX,
            gtids: GtidSet::new(),
            epoch: Some(Epoch::INITIAL),
        };
        assert_eq!(pos.resume_on(uuid), TailStart::Offset(u64::MAX));
    }
}
