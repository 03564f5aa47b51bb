//! What the NATS sink publishes for a batch: subjects, message ids and payloads. Pure: no
//! client, no clock, so that the shapes documented in `docs/OPERATIONS.md` ("NATS JetStream
//! sink") are tested without a server.
//!
//! Every message id starts with `PIPELINE/`, the pipeline's name: a stream may be shared by
//! several pipelines (the default one is), whose filters make different messages of one
//! source transaction, and the stream must never drop one pipeline's message as a repeat of
//! another's. A pipeline name holds only letters, digits and `-_=./` (it keys the positions
//! bucket) and what follows the last `/` never holds one, so two pipelines never share an id.
//!
//! - Live transaction, `per = "txn"`: one message, payload
//!   `{"gtid":"UUID:N","offset":N,"ts":"RFC 3339","changes":[envelope, ...]}`, id
//!   `PIPELINE/UUID:N`.
//! - Live transaction, `per = "op"`: one message per change, payload its envelope, id
//!   `PIPELINE/UUID:N:I` (I = the change's index among the transaction's changes that pass
//!   the pipeline's filter, from 0).
//! - Bootstrap row (`op: read`), in both modes: one message per row, id
//!   `PIPELINE/boot:SERVER_UUID:HASH` where HASH names the tree, key and value, so that a
//!   chunk sent again after a crash (same rows, same values) is dropped by the stream.
//! - Change a bootstrap applies from a record the source wrote while it ran, in both modes:
//!   one message per change, payload its envelope (with the record's GTID, offset and time),
//!   id `PIPELINE/UUID:N:I` from the record's GTID and I = the change's index among the
//!   record's changes as logged, from 0. A copy resumed after a crash sends the record again
//!   in another step, with its cursor where the stored progress left it: perhaps fewer of its
//!   changes, never others, and each with its id of before, so the stream drops them. (One
//!   message per change, not per record: the copy applies only the record's changes on
//!   ranges already copied, which part depending on how the copy was cut, and a message
//!   shaped as a transaction would pass that part off as the whole.)
//! - A tree's `create_tree` and `create_index` that come with each chunk of a tree with
//!   indexes (no record of their own), in both modes: one message per change, id
//!   `PIPELINE/boot:SERVER_UUID:EPOCH:OFFSET:I:HASH` from the bootstrap progress the batch
//!   stores (OFFSET = the last live record the step handled; I = the change's index in the
//!   step) and HASH of the message's payload. The tree events of a step do not move OFFSET,
//!   and on an idle source every tree's come at the same one with the same I: HASH (which
//!   names the tree, the index and its definition) keeps them apart, and stays what it was
//!   when the same step is sent again after a crash or a retry, where a counter of the
//!   copy's events would not (a resumed copy does not know how many the crashed one had
//!   sent).
//!
//! Owns: these shapes. Must never: publish, or decide when the checkpoint moves.

use std::collections::HashMap;
use std::ops::Range;

use async_nats::Subject;
use bytes::Bytes;
use tideline_wal::{Op, Transaction};

use crate::envelope::{self, GtidText, SourceText, TsText};
use crate::pipeline::PipelineCheckpoint;
use crate::sink::{Batch, Item};

/// One message per transaction or per change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    /// One message per transaction: its changes in one payload.
    Txn,
    /// One message per change.
    Op,
}

/// The `{tree}` of a transaction whose changes touch several trees, in `per = "txn"` mode.
pub const MULTI_TREE: &str = "_multi";

/// A message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Subject (cheap to clone: shared bytes).
    pub subject: Subject,
    /// The `Nats-Msg-Id` header: the stream drops a second message with the same id within
    /// its duplicate window.
    pub id: String,
    /// JSON payload: a slice of the one buffer all payloads of its batch were written into.
    pub payload: Bytes,
}

/// The tree as one subject token: `.`, `*`, `>` and whitespace become `_` (they would split or
/// widen the subject), an empty name is `_`.
pub fn subject_token(tree: &str) -> String {
    if tree.is_empty() {
        return "_".into();
    }
    tree.chars()
        .map(|c| {
            if c == '.' || c == '*' || c == '>' || c.is_whitespace() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// `template` with `{tree}` replaced by `tree`'s token.
pub fn subject(template: &str, tree: &str) -> String {
    template.replace("{tree}", &subject_token(tree))
}

fn op_tree(op: &Op) -> &str {
    op.tree()
}

/// The tree a transaction's message is published under: its only tree, or [`MULTI_TREE`].
pub fn txn_tree(txn: &Transaction) -> &str {
    let mut trees = txn.ops.iter().map(op_tree);
    let first = trees.next().unwrap_or(MULTI_TREE);
    if trees.all(|t| t == first) {
        first
    } else {
        MULTI_TREE
    }
}

/// Hex of the first 16 bytes of SHA-256 over length-prefixed parts.
fn digest(parts: &[&[u8]]) -> String {
    use std::fmt::Write as _;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_le_bytes());
        ctx.update(p);
    }
    let mut hex = String::with_capacity(32);
    for b in &ctx.finish().as_ref()[..16] {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// Trees whose subject a [`Builder`] keeps at most; past it, it forgets them all and starts
/// again (a bound, not a cache policy: real sources have far fewer trees).
const SUBJECTS_MAX: usize = 4096;

/// Builds the messages of batches without a JSON value tree: every payload of a batch is
/// written by the envelope's direct writer into one buffer that its messages share, and each
/// tree's subject is rendered once and kept between batches.
#[derive(Debug)]
pub struct Builder {
    /// `PIPELINE/`: what every id starts with.
    prefix: String,
    template: String,
    per: Per,
    subjects: HashMap<String, Subject>,
    /// The last batch's payload bytes: the next buffer starts that large.
    bytes_hint: usize,
}

/// A message whose payload is still a range of the batch's buffer.
struct Pending {
    subject: Subject,
    id: String,
    payload: Range<usize>,
}

impl Builder {
    /// Messages of pipeline `pipeline` for subject `template` (with `{tree}`), one per
    /// transaction or per change.
    pub fn new(pipeline: &str, template: &str, per: Per) -> Builder {
        Builder {
            prefix: format!("{pipeline}/"),
            template: template.to_owned(),
            per,
            subjects: HashMap::new(),
            bytes_hint: 0,
        }
    }

    fn subject(&mut self, tree: &str) -> Subject {
        if let Some(s) = self.subjects.get(tree) {
            return s.clone();
        }
        if self.subjects.len() >= SUBJECTS_MAX {
            self.subjects.clear();
        }
        let s = Subject::from(subject(&self.template, tree));
        self.subjects.insert(tree.to_owned(), s.clone());
        s
    }

    /// The messages of `batch`, in order.
    pub fn messages(&mut self, batch: &Batch) -> Vec<Message> {
        let mut buf = Vec::with_capacity(self.bytes_hint);
        let mut pending = Vec::with_capacity(batch.items.len());
        let uuid = batch.source;
        let prefix = self.prefix.clone();
        // One rendering of the server's uuid, of each origin's uuid and of each second per
        // batch: the transactions' texts only change their numbers.
        let mut live = SourceText::live(uuid, 0, "", "");
        let mut gtids = GtidText::default();
        let mut times = TsText::default();
        for item in &batch.items {
            match item {
                Item::Txn(t) => {
                    let gtid = gtids.render(&t.gtid);
                    let ts = times.render(t.timestamp_us);
                    live.set_live(t.offset.get(), gtid, ts);
                    let source = &live;
                    match self.per {
                        Per::Txn => {
                            let start = buf.len();
                            // A GTID and an RFC 3339 time hold nothing JSON escapes.
                            buf.extend_from_slice(b"{\"gtid\":\"");
                            buf.extend_from_slice(gtid.as_bytes());
                            buf.extend_from_slice(b"\",\"offset\":");
                            envelope::push_u64(&mut buf, t.offset.get());
                            buf.extend_from_slice(b",\"ts\":\"");
                            buf.extend_from_slice(ts.as_bytes());
                            buf.extend_from_slice(b"\",\"changes\":[");
                            for (i, op) in t.ops.iter().enumerate() {
                                if i > 0 {
                                    buf.push(b',');
                                }
                                envelope::write_op(op, source, &mut buf);
                            }
                            buf.extend_from_slice(b"]}");
                            pending.push(Pending {
                                subject: self.subject(txn_tree(t)),
                                id: format!("{prefix}{gtid}"),
                                payload: start..buf.len(),
                            });
                        }
                        Per::Op => {
                            for (i, op) in t.ops.iter().enumerate() {
                                let start = buf.len();
                                envelope::write_op(op, source, &mut buf);
                                pending.push(Pending {
                                    subject: self.subject(op_tree(op)),
                                    id: format!("{prefix}{gtid}:{i}"),
                                    payload: start..buf.len(),
                                });
                            }
                        }
                    }
                }
                Item::Chunk {
                    tree,
                    merge_operator,
                    entries,
                    ..
                } => {
                    let subject = self.subject(tree);
                    let source = SourceText::new(uuid, None);
                    for (k, v) in entries {
                        let start = buf.len();
                        envelope::write_chunk_row(
                            tree,
                            merge_operator.as_deref(),
                            k,
                            v,
                            &source,
                            &mut buf,
                        );
                        pending.push(Pending {
                            subject: subject.clone(),
                            id: format!("{prefix}boot:{uuid}:{}", digest(&[tree.as_bytes(), k, v])),
                            payload: start..buf.len(),
                        });
                    }
                }
                Item::Record(r) => {
                    let t = &r.txn;
                    let gtid = gtids.render(&t.gtid);
                    let ts = times.render(t.timestamp_us);
                    live.set_live(t.offset.get(), gtid, ts);
                    for (i, op) in r.indexed_ops() {
                        let start = buf.len();
                        envelope::write_op(op, &live, &mut buf);
                        pending.push(Pending {
                            subject: self.subject(op_tree(op)),
                            id: format!("{prefix}{gtid}:{i}"),
                            payload: start..buf.len(),
                        });
                    }
                }
                Item::Ops(ops) => {
                    let step = match PipelineCheckpoint::decode(&batch.checkpoint) {
                        Ok(PipelineCheckpoint::Bootstrap(p)) => {
                            format!("{}:{}", p.epoch.unwrap_or_default(), p.after_offset)
                        }
                        // Not a bootstrap checkpoint (a caller of its own): name the step by it.
                        _ => digest(&[&batch.checkpoint]),
                    };
                    let source = SourceText::new(uuid, None);
                    for (i, op) in ops.iter().enumerate() {
                        let start = buf.len();
                        envelope::write_op(op, &source, &mut buf);
                        let hash = digest(&[&buf[start..]]);
                        pending.push(Pending {
                            subject: self.subject(op_tree(op)),
                            id: format!("{prefix}boot:{uuid}:{step}:{i}:{hash}"),
                            payload: start..buf.len(),
                        });
                    }
                }
            }
        }
        self.bytes_hint = buf.len();
        let all = Bytes::from(buf);
        pending
            .into_iter()
            .map(|p| Message {
                subject: p.subject,
                id: p.id,
                payload: all.slice(p.payload),
            })
            .collect()
    }
}

/// The messages of `batch` of pipeline `pipeline`, in order (a [`Builder`] used once).
pub fn messages(batch: &Batch, pipeline: &str, template: &str, per: Per) -> Vec<Message> {
    Builder::new(pipeline, template, per).messages(batch)
}

#[cfg(test)]
mod tests;
