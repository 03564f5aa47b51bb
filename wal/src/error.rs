//! Errors of the log.

use std::io;

use crate::segment::{FORMAT_VERSION, FORMAT_VERSION_MIN, RKYV_FORMAT};
use crate::{GtidSet, Offset};

/// What went wrong in the log. Each variant says the cause and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A write or fsync failed. The log accepts nothing more; the process must stop and
    /// restart. Recovery keeps every acknowledged record; an append that failed with this
    /// error has an unknown outcome (its bytes may have reached the disk before the failure).
    #[error(
        "the log is poisoned after a failed write or fsync ({reason}); no append is accepted: \
         stop the node, check the disk, and restart (recovery keeps every acknowledged record; \
         one whose append failed with this error may or may not be there)"
    )]
    Poisoned {
        /// The original failure.
        reason: String,
    },
    /// Damage that is not a torn tail.
    #[error(
        "log corrupt in {file} at byte {byte}: {reason}; restore this node from a replica or \
         backup, or inspect it with `tideline log dump`"
    )]
    Corrupt {
        /// Segment file.
        file: String,
        /// Byte position in the file.
        byte: u64,
        /// What is wrong.
        reason: String,
    },
    /// A segment in a format this build does not read: written by a newer Tideline, or by a
    /// build with other rkyv features. Its header is whole and its checksum valid, so the log
    /// is not damaged; the open changed nothing.
    #[error("{}", unsupported_format_text(.file, *.format, *.rkyv))]
    UnsupportedFormat {
        /// Segment file.
        file: String,
        /// Segment format found in its header.
        format: u16,
        /// rkyv format id found in its header.
        rkyv: u16,
    },
    /// The requested offset was removed by retention or is past the end.
    #[error(
        "offset {requested} is not available: the log holds {first_available}..={last}; \
         start from an available position or re-bootstrap"
    )]
    OffsetUnavailable {
        /// What was asked for.
        requested: Offset,
        /// First offset still in the log.
        first_available: Offset,
        /// Last visible offset (0 = empty log).
        last: u64,
    },
    /// Some GTIDs the reader lacks were removed by retention.
    #[error(
        "GTIDs {missing} are needed but were purged from this log; bootstrap from a snapshot \
         or pick an upstream that still has them"
    )]
    GtidsPurged {
        /// What the reader lacks and the log no longer has.
        missing: GtidSet,
    },
    /// The log's history was replaced (the node was bootstrapped from a copy) after this reader
    /// was opened.
    #[error(
        "this node's log was replaced by a bootstrap and now starts after GTIDs {gtids_before}; \
         resubscribe by GTID set (a consumer that lacks those GTIDs must bootstrap as well)"
    )]
    HistoryReset {
        /// The GTIDs before the new history.
        gtids_before: GtidSet,
    },
    /// One record is larger than the configured limit.
    #[error("record of {bytes} bytes exceeds the limit of {max} bytes; split the transaction")]
    RecordTooLarge {
        /// Encoded size.
        bytes: u64,
        /// Limit.
        max: u32,
    },
    /// The record is one no reader would accept (a GTID number 0, for instance); nothing was
    /// written.
    #[error("record refused: {reason}; fix the writer (nothing was written)")]
    InvalidRecord {
        /// What is wrong with it.
        reason: String,
    },
    /// The record could not be encoded.
    #[error("could not encode record: {reason}")]
    Encode {
        /// Encoder's message.
        reason: String,
    },
    /// A slot operation named a slot that does not exist.
    #[error("no slot named `{0}`; list slots with `tideline status`")]
    NoSuchSlot(String),
    /// A subscription named a slot that retention's cap invalidated: it holds no log, so its
    /// consumer must not believe its position is kept.
    #[error(
        "slot {name} was invalidated: {reason}. It holds no log any more; until it is dropped, \
         subscribe with another slot name"
    )]
    SlotInvalidated {
        /// The slot.
        name: String,
        /// Why, from retention (the cap and the offsets).
        reason: String,
    },
    /// A slot name is not acceptable.
    #[error("invalid slot name `{0}`: use 1-64 characters from [A-Za-z0-9_.-]")]
    BadSlotName(String),
    /// The log was opened read-only (for inspection).
    #[error("the log is open read-only; appends and slot changes go through the running node")]
    ReadOnly,
    /// The log has been closed.
    #[error("the log is closed")]
    Closed,
    /// Another process has this log open for writing (a running node, `demo` or `bench`).
    #[error(
        "the log in {dir} is in use by {holder}; stop that process first or use another data \
         directory (read-only tools such as `tideline log dump|info|verify` work beside it)"
    )]
    InUse {
        /// The log directory.
        dir: String,
        /// Who holds it: `PID n`, or `another process` when the lock file names none.
        holder: String,
    },
    /// An I/O error outside the append path (open, read, retention).
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the file.
        context: String,
        /// The cause.
        source: io::Error,
    },
}

/// The message of [`Error::UnsupportedFormat`]: who wrote the segment and what to run. It must
/// not read as damage: the advice for damage (restore from a replica or backup) would replace
/// a healthy log.
fn unsupported_format_text(file: &str, format: u16, rkyv: u16) -> String {
    let found = format!(
        "segment format {format}, rkyv {rkyv:#06b}; this build reads segment formats \
         {FORMAT_VERSION_MIN}-{FORMAT_VERSION}, rkyv {RKYV_FORMAT:#06b}"
    );
    if format > FORMAT_VERSION {
        format!(
            "{file} was written by a newer Tideline ({found}); the log is not damaged and \
             was left as it is: upgrade Tideline, to a release that reads segment format \
             {format}, and run that on this data directory"
        )
    } else {
        format!(
            "{file} was written by a Tideline built with other rkyv features ({found}); the \
             log is not damaged and was left as it is: run a build whose rkyv features match \
             the ones that wrote it on this data directory"
        )
    }
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
