//! The change envelope: one JSON object per change, shared by every sink that ships JSON (the
//! file, webhook and NATS sinks), documented in `docs/OPERATIONS.md` ("The change envelope").
//!
//! ```json
//! {"op":"put","tree":"users","key":"u1","before":"{\"n\":1}","after":"{\"n\":2}",
//!  "source":{"server_uuid":"…","offset":12,"gtid":"…:12","ts":"2026-11-30T08:00:00.000000Z"}}
//! ```
//!
//! - `op`: `put`, `delete`, `merge` (its `operand`; the value after it is the tree's merge
//!   operator applied to the value before), `read` (a row copied by a bootstrap, with its
//!   tree's `merge_operator` when it has one), `create_tree` (with `merge_operator` when it
//!   has one), `drop_tree` (no key), `create_index` (with `name`, `paths`, `unique`) or
//!   `drop_index` (with `name`).
//! - `key`, `before`, `after`, `operand`: the bytes as a UTF-8 string, or, when they are not
//!   UTF-8, base64 under the same name with `_b64` appended (`key_b64`). Values are never
//!   parsed: a JSON document travels as its text, exactly as stored.
//! - `before`: only where the log carries a before-image (writers that record them).
//! - `source.offset` and `source.gtid`: the transaction's place in the source's log, also for
//!   the changes a bootstrap applies from records the source wrote while it ran; `null` for
//!   bootstrap rows and for the trees and indexes a bootstrap declares before a chunk (the
//!   copy as a whole is positioned by its end GTID set). `source.ts`: the origin's commit
//!   time, RFC 3339 UTC, clamped to 1970-01-01 .. 9999-12-31T23:59:59.999999Z (the origin's
//!   clock is not checked).
//!
//! Owns: the envelope's shape and its text helpers. Must never: decide batching, delivery or
//! positions (the pipeline and the sinks do).

use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{Map, Value, json};
use tideline_wal::{Op, Transaction};

use crate::sink::{CopyRecord, Item};

/// The last microsecond RFC 3339 can write: 9999-12-31T23:59:59.999999Z.
const RFC3339_US_MAX: u64 = 253_402_300_799_999_999;

/// A commit time in microseconds since the Unix epoch, clamped to what RFC 3339 can write
/// (1970-01-01 .. 9999-12-31T23:59:59.999999): the origin node's clock is not checked, and
/// one set far wrong (or a peer) must not stop a sink.
fn rfc3339_clamp_us(timestamp_us: i64) -> u64 {
    u64::try_from(timestamp_us).unwrap_or(0).min(RFC3339_US_MAX)
}

/// RFC 3339 text (UTC, microseconds) for a timestamp in microseconds since the Unix epoch.
/// A time before 1970 renders as 1970-01-01T00:00:00.000000Z, one after year 9999 as
/// 9999-12-31T23:59:59.999999Z.
pub fn rfc3339_us(timestamp_us: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(rfc3339_clamp_us(timestamp_us));
    humantime::format_rfc3339_micros(t).to_string()
}

/// Puts `bytes` into `obj` as `field` (UTF-8) or `field_b64` (anything else).
pub fn put_bytes(obj: &mut Map<String, Value>, field: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            obj.insert(field.to_owned(), Value::String(s.to_owned()));
        }
        Err(_) => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
            obj.insert(format!("{field}_b64"), Value::String(b64));
        }
    }
}

/// Where a change comes from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// The source node.
    pub server_uuid: uuid::Uuid,
    /// The transaction (or the record of a bootstrap's change); `None` for a bootstrap's rows
    /// and the trees and indexes it declares.
    pub txn: Option<&'a Transaction>,
}

impl Source<'_> {
    fn json(&self) -> Value {
        match self.txn {
            Some(t) => json!({
                "server_uuid": self.server_uuid.to_string(),
                "offset": t.offset.get(),
                "gtid": t.gtid.to_string(),
                "ts": rfc3339_us(t.timestamp_us),
            }),
            None => json!({
                "server_uuid": self.server_uuid.to_string(),
                "offset": null,
                "gtid": null,
                "ts": null,
            }),
        }
    }
}

/// The envelope of one op.
pub fn op_envelope(op: &Op, source: Source<'_>) -> Value {
    let mut obj = Map::new();
    let (name, tree) = (op.kind(), op.tree());
    obj.insert("op".into(), Value::String(name.into()));
    obj.insert("tree".into(), Value::String(tree.to_owned()));
    match op {
        Op::Put {
            key, value, before, ..
        } => {
            put_bytes(&mut obj, "key", key);
            if let Some(b) = before {
                put_bytes(&mut obj, "before", b);
            }
            put_bytes(&mut obj, "after", value);
        }
        Op::Delete { key, before, .. } => {
            put_bytes(&mut obj, "key", key);
            if let Some(b) = before {
                put_bytes(&mut obj, "before", b);
            }
        }
        Op::Merge { key, operand, .. } => {
            put_bytes(&mut obj, "key", key);
            put_bytes(&mut obj, "operand", operand);
        }
        Op::CreateTree { merge_operator, .. } => {
            if let Some(m) = merge_operator {
                obj.insert("merge_operator".into(), Value::String(m.clone()));
            }
        }
        Op::DropTree { .. } => {}
        Op::CreateIndex {
            name,
            paths,
            unique,
            ..
        } => {
            obj.insert("name".into(), Value::String(name.clone()));
            obj.insert("paths".into(), json!(paths));
            obj.insert("unique".into(), Value::Bool(*unique));
        }
        Op::DropIndex { name, .. } => {
            obj.insert("name".into(), Value::String(name.clone()));
        }
    }
    obj.insert("source".into(), source.json());
    Value::Object(obj)
}

/// The envelope of a row copied by a bootstrap (`op: read`): with `merge_operator` when its
/// tree has one, since a bootstrap declares the tree (`create_tree`) only before a chunk of
/// a tree with indexes, and a reader needs the operator to apply the `merge`s that follow.
pub fn chunk_row_envelope(
    tree: &str,
    merge_operator: Option<&str>,
    key: &[u8],
    value: &[u8],
    server_uuid: uuid::Uuid,
) -> Value {
    let mut obj = Map::new();
    obj.insert("op".into(), Value::String("read".into()));
    obj.insert("tree".into(), Value::String(tree.to_owned()));
    put_bytes(&mut obj, "key", key);
    put_bytes(&mut obj, "after", value);
    if let Some(m) = merge_operator {
        obj.insert("merge_operator".into(), Value::String(m.to_owned()));
    }
    obj.insert(
        "source".into(),
        Source {
            server_uuid,
            txn: None,
        }
        .json(),
    );
    Value::Object(obj)
}

/// Calls `f` with the envelope of every change of `item`, in order.
pub fn for_each_envelope(item: &Item, server_uuid: uuid::Uuid, mut f: impl FnMut(Value)) {
    match item {
        Item::Txn(t) => {
            let source = Source {
                server_uuid,
                txn: Some(t),
            };
            for op in &t.ops {
                f(op_envelope(op, source));
            }
        }
        Item::Record(r) => {
            let source = Source {
                server_uuid,
                txn: Some(&r.txn),
            };
            for op in &r.txn.ops {
                f(op_envelope(op, source));
            }
        }
        Item::Ops(ops) => {
            let source = Source {
                server_uuid,
                txn: None,
            };
            for op in ops {
                f(op_envelope(op, source));
            }
        }
        Item::Chunk {
            tree,
            merge_operator,
            entries,
            ..
        } => {
            for (k, v) in entries {
                f(chunk_row_envelope(
                    tree,
                    merge_operator.as_deref(),
                    k,
                    v,
                    server_uuid,
                ));
            }
        }
    }
}

/// Appends the envelope of every change of `item` to `out` as JSON lines (one object and a
/// `\n` each): the same bytes as serializing what [`for_each_envelope`] gives, written
/// without building a [`Value`] per change (the file sink's hot path).
pub fn write_lines(item: &Item, server_uuid: uuid::Uuid, out: &mut Vec<u8>) {
    match item {
        Item::Txn(t) | Item::Record(CopyRecord { txn: t, .. }) => {
            let source = SourceText::new(server_uuid, Some(t));
            for op in &t.ops {
                write_op(op, &source, out);
                out.push(b'\n');
            }
        }
        Item::Ops(ops) => {
            let source = SourceText::new(server_uuid, None);
            for op in ops {
                write_op(op, &source, out);
                out.push(b'\n');
            }
        }
        Item::Chunk {
            tree,
            merge_operator,
            entries,
            ..
        } => {
            let source = SourceText::new(server_uuid, None);
            for (k, v) in entries {
                write_chunk_row(tree, merge_operator.as_deref(), k, v, &source, out);
                out.push(b'\n');
            }
        }
    }
}

/// `,"source":{...}}`: the end of every envelope of one transaction (or of one bootstrap
/// step), rendered once and shared by its envelopes.
#[derive(Debug, Clone)]
pub struct SourceText {
    text: Vec<u8>,
    /// The length of `,"source":{"server_uuid":"…",`, the part every transaction shares.
    open_len: usize,
}

impl SourceText {
    /// The source of `txn`'s changes (its offset, GTID and commit time), or of changes
    /// without a transaction of their own (`None`: a bootstrap's).
    pub fn new(server_uuid: uuid::Uuid, txn: Option<&Transaction>) -> SourceText {
        match txn {
            Some(t) => SourceText::live(
                server_uuid,
                t.offset.get(),
                &t.gtid.to_string(),
                &rfc3339_us(t.timestamp_us),
            ),
            None => {
                let mut s = SourceText::open(server_uuid);
                s.text
                    .extend_from_slice(b"\"offset\":null,\"gtid\":null,\"ts\":null}}");
                s
            }
        }
    }

    /// The source of a transaction's changes whose GTID and RFC 3339 commit time
    /// ([`rfc3339_us`]) the caller has already rendered.
    pub fn live(server_uuid: uuid::Uuid, offset: u64, gtid: &str, ts: &str) -> SourceText {
        let mut s = SourceText::open(server_uuid);
        s.set_live(offset, gtid, ts);
        s
    }

    /// Makes this the source of another transaction of the same server (what
    /// [`SourceText::live`] gives, without rendering the server's uuid again).
    pub fn set_live(&mut self, offset: u64, gtid: &str, ts: &str) {
        // Uuids, GTIDs, numbers and RFC 3339 times hold nothing JSON escapes.
        let s = &mut self.text;
        s.truncate(self.open_len);
        s.extend_from_slice(b"\"offset\":");
        push_u64(s, offset);
        s.extend_from_slice(b",\"gtid\":\"");
        s.extend_from_slice(gtid.as_bytes());
        s.extend_from_slice(b"\",\"ts\":\"");
        s.extend_from_slice(ts.as_bytes());
        s.extend_from_slice(b"\"}}");
    }

    fn open(server_uuid: uuid::Uuid) -> SourceText {
        let mut text = Vec::with_capacity(160);
        text.extend_from_slice(b",\"source\":{\"server_uuid\":\"");
        text.extend_from_slice(
            server_uuid
                .hyphenated()
                .encode_lower(&mut uuid::Uuid::encode_buffer())
                .as_bytes(),
        );
        text.extend_from_slice(b"\",");
        let open_len = text.len();
        SourceText { text, open_len }
    }
}

/// Appends `n` in decimal (what `{n}` gives, without the formatting machinery).
pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    out.extend_from_slice(decimal(n, &mut digits));
}

/// `n` in decimal ASCII digits, written at the end of `digits`.
fn decimal(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &digits[i..]
}

/// Renders GTIDs (`UUID:N`, what `Gtid`'s `Display` gives) into one buffer, the uuid's text
/// kept from the last GTID of the same origin.
#[derive(Debug, Default)]
pub struct GtidText {
    uuid: Option<uuid::Uuid>,
    text: String,
    /// The length of `UUID:`.
    prefix_len: usize,
}

impl GtidText {
    /// The text of `gtid`.
    pub fn render(&mut self, gtid: &tideline_wal::Gtid) -> &str {
        if self.uuid != Some(gtid.uuid) {
            self.text.clear();
            self.text.push_str(
                gtid.uuid
                    .hyphenated()
                    .encode_lower(&mut uuid::Uuid::encode_buffer()),
            );
            self.text.push(':');
            self.prefix_len = self.text.len();
            self.uuid = Some(gtid.uuid);
        }
        self.text.truncate(self.prefix_len);
        let mut digits = [0u8; 20];
        for &d in decimal(gtid.seq, &mut digits) {
            self.text.push(char::from(d));
        }
        &self.text
    }
}

/// Renders commit times as [`rfc3339_us`] does, the text of the second kept from the last
/// time in the same second (a batch's transactions mostly share their second).
#[derive(Debug, Default)]
pub struct TsText {
    /// The second of `text`, when `text` holds one in the shape `….uuuuuuZ`.
    second: Option<u64>,
    text: String,
}

impl TsText {
    /// The RFC 3339 text of `timestamp_us` (clamped as [`rfc3339_us`] does).
    pub fn render(&mut self, timestamp_us: i64) -> &str {
        let us = rfc3339_clamp_us(timestamp_us);
        let (second, micros) = (us / 1_000_000, us % 1_000_000);
        if self.second != Some(second) {
            self.text = rfc3339_us(timestamp_us);
            // `….uuuuuuZ`: only then are the microseconds the 6 digits before the end.
            let b = self.text.as_bytes();
            let shaped = b.len() >= 8 && b[b.len() - 1] == b'Z' && b[b.len() - 8] == b'.';
            self.second = shaped.then_some(second);
            return &self.text;
        }
        let end = self.text.len() - 1;
        self.text.truncate(end - 6);
        let mut digits = [b'0'; 6];
        let mut n = micros;
        for d in digits.iter_mut().rev() {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
        for &d in &digits {
            self.text.push(char::from(d));
        }
        self.text.push('Z');
        &self.text
    }
}

/// Appends the envelope of a chunk's row (what [`chunk_row_envelope`] gives) to `out` as one
/// JSON object, without a newline.
pub fn write_chunk_row(
    tree: &str,
    merge_operator: Option<&str>,
    key: &[u8],
    value: &[u8],
    source: &SourceText,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(b"{\"op\":\"read\",\"tree\":");
    write_str(out, tree);
    write_bytes_field(out, "key", key);
    write_bytes_field(out, "after", value);
    if let Some(m) = merge_operator {
        out.extend_from_slice(b",\"merge_operator\":");
        write_str(out, m);
    }
    out.extend_from_slice(&source.text);
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    // serde_json escapes only control characters, `"` and `\\`: without them the text is
    // its own JSON string.
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("a string serializes into memory");
    }
}

/// `,"field":"text"` or `,"field_b64":"..."`, as [`put_bytes`] names it.
fn write_bytes_field(out: &mut Vec<u8>, field: &str, bytes: &[u8]) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(field.as_bytes());
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            out.extend_from_slice(b"\":");
            write_str(out, s);
        }
        Err(_) => {
            out.extend_from_slice(b"_b64\":\"");
            let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
            out.extend_from_slice(b64.as_bytes());
            out.push(b'"');
        }
    }
}

/// Appends the envelope of `op` (what [`op_envelope`] gives) to `out` as one JSON object,
/// without a newline.
pub fn write_op(op: &Op, source: &SourceText, out: &mut Vec<u8>) {
    let (name, tree) = (op.kind().as_bytes(), op.tree());
    out.extend_from_slice(b"{\"op\":\"");
    out.extend_from_slice(name);
    out.extend_from_slice(b"\",\"tree\":");
    write_str(out, tree);
    match op {
        Op::Put {
            key, value, before, ..
        } => {
            write_bytes_field(out, "key", key);
            if let Some(b) = before {
                write_bytes_field(out, "before", b);
            }
            write_bytes_field(out, "after", value);
        }
        Op::Delete { key, before, .. } => {
            write_bytes_field(out, "key", key);
            if let Some(b) = before {
                write_bytes_field(out, "before", b);
            }
        }
        Op::Merge { key, operand, .. } => {
            write_bytes_field(out, "key", key);
            write_bytes_field(out, "operand", operand);
        }
        Op::CreateTree { merge_operator, .. } => {
            if let Some(m) = merge_operator {
                out.extend_from_slice(b",\"merge_operator\":");
                write_str(out, m);
            }
        }
        Op::DropTree { .. } => {}
        Op::CreateIndex {
            name,
            paths,
            unique,
            ..
        } => {
            out.extend_from_slice(b",\"name\":");
            write_str(out, name);
            out.extend_from_slice(b",\"paths\":[");
            for (i, p) in paths.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, p);
            }
            out.extend_from_slice(if *unique {
                b"],\"unique\":true"
            } else {
                b"],\"unique\":false"
            });
        }
        Op::DropIndex { name, .. } => {
            out.extend_from_slice(b",\"name\":");
            write_str(out, name);
        }
    }
    out.extend_from_slice(&source.text);
}

/// One op of every kind, with keys, values and tree names that need escaping or base64: the
/// fixture of the tests that compare the direct writer with the JSON values.
#[cfg(test)]
pub(crate) fn sample_ops() -> Vec<Op> {
    vec![
        Op::CreateTree {
            tree: "c".into(),
            merge_operator: Some("add".into()),
        },
        Op::CreateTree {
            tree: "plain".into(),
            merge_operator: None,
        },
        Op::Put {
            tree: "t\"q".into(),
            key: b"k\n1".to_vec(),
            value: vec![0xff, 0],
            before: Some("old \u{e9}".as_bytes().to_vec()),
        },
        Op::Put {
            tree: "t".into(),
            key: vec![0x80],
            value: b"{\"a\":1}".to_vec(),
            before: None,
        },
        Op::Delete {
            tree: "t".into(),
            key: b"gone".to_vec(),
            before: Some(b"was".to_vec()),
        },
        Op::Delete {
            tree: "t".into(),
            key: b"gone2".to_vec(),
            before: None,
        },
        Op::Merge {
            tree: "c".into(),
            key: b"n".to_vec(),
            operand: b"5".to_vec(),
        },
        Op::CreateIndex {
            tree: "t".into(),
            name: "by\"n".into(),
            paths: vec!["/a".into(), "/b~1c".into()],
            unique: true,
        },
        Op::DropIndex {
            tree: "t".into(),
            name: "old".into(),
        },
        Op::DropTree { tree: "t".into() },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use tideline_wal::{Gtid, Offset};

    #[test]
    fn a_put_carries_before_after_and_its_source() {
        let uuid = uuid::Uuid::from_bytes([1; 16]);
        let txn = Transaction {
            offset: Offset::new(12).unwrap(),
            gtid: Gtid::new(uuid, 12).unwrap(),
            timestamp_us: 1_700_000_000_000_000,
            ops: vec![Op::Put {
                tree: "users".into(),
                key: b"u1".to_vec(),
                value: b"{\"n\":2}".to_vec(),
                before: Some(vec![0xff]),
            }],
        };
        let mut out = vec![];
        for_each_envelope(&Item::Txn(txn), uuid, |v| out.push(v));
        assert_eq!(out.len(), 1);
        let e = &out[0];
        assert_eq!(e["op"], "put");
        assert_eq!(e["key"], "u1");
        assert_eq!(e["after"], "{\"n\":2}");
        assert_eq!(e["before_b64"], "/w==");
        assert!(e.get("before").is_none());
        assert_eq!(e["source"]["offset"], 12);
        assert_eq!(e["source"]["gtid"], format!("{uuid}:12"));
        assert_eq!(e["source"]["ts"], "2023-11-14T22:13:20.000000Z");
    }

    #[test]
    fn bootstrap_rows_are_reads_without_a_gtid() {
        let uuid = uuid::Uuid::from_bytes([2; 16]);
        let item = Item::Chunk {
            tree: "t".into(),
            merge_operator: None,
            from: vec![],
            to: None,
            entries: tideline_wal::PackedEntries::from_pairs(vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec()),
            ])
            .unwrap(),
        };
        let mut out = vec![];
        for_each_envelope(&item, uuid, |v| out.push(v));
        assert_eq!(out.len(), 2);
        assert_eq!(out[1]["op"], "read");
        assert_eq!(out[1]["key"], "b");
        assert!(out[1]["source"]["gtid"].is_null());
    }

    /// A bootstrap declares a tree (`create_tree`, with its merge operator) only before a
    /// chunk of a tree with indexes; every chunk carries the operator. A reader of a copy
    /// gets `read` rows and then `merge` operands, whose documented meaning ("the tree's
    /// merge operator applied") needs the operator: the rows of a tree that has one name it,
    /// in every sink's shape (values, and the lines the file sink writes).
    #[test]
    fn bootstrap_rows_name_their_trees_merge_operator() {
        let uuid = uuid::Uuid::from_bytes([6; 16]);
        let chunk = |merge_operator: Option<&str>| Item::Chunk {
            tree: "cnt".into(),
            merge_operator: merge_operator.map(String::from),
            from: vec![],
            to: None,
            entries: tideline_wal::PackedEntries::from_pairs(vec![(
                b"c1".to_vec(),
                b"100".to_vec(),
            )])
            .unwrap(),
        };
        let mut values = vec![];
        for_each_envelope(&chunk(Some("add")), uuid, |v| values.push(v));
        assert_eq!(values.len(), 1);
        assert_eq!(values[0]["op"], "read");
        assert_eq!(
            values[0]["merge_operator"], "add",
            "a copied row of an `add` tree names its operator: {}",
            values[0]
        );
        let mut lines = Vec::new();
        write_lines(&chunk(Some("add")), uuid, &mut lines);
        let line: Value = serde_json::from_slice(&lines).unwrap();
        assert_eq!(line, values[0]);
        // A tree without an operator: no field.
        let mut values = vec![];
        for_each_envelope(&chunk(None), uuid, |v| values.push(v));
        assert!(values[0].get("merge_operator").is_none(), "{}", values[0]);
    }

    /// A change a bootstrap applies from a record the source wrote while it ran names that
    /// record, as a live change does: a receiver de-duplicates it by its GTID.
    #[test]
    fn copy_time_changes_carry_their_records_gtid() {
        let uuid = uuid::Uuid::from_bytes([3; 16]);
        let txn = Transaction {
            offset: Offset::new(9).unwrap(),
            gtid: Gtid::new(uuid, 9).unwrap(),
            timestamp_us: 1_700_000_000_000_000,
            ops: sample_ops(),
        };
        let item = Item::Record(CopyRecord::filtered(txn, |op| op.kind() == "merge"));
        let mut out = vec![];
        for_each_envelope(&item, uuid, |v| out.push(v));
        assert!(!out.is_empty());
        for e in &out {
            assert_eq!(e["op"], "merge");
            assert_eq!(e["source"]["offset"], 9);
            assert_eq!(e["source"]["gtid"], format!("{uuid}:9"));
            assert_eq!(e["source"]["ts"], "2023-11-14T22:13:20.000000Z");
        }
    }

    /// A commit time comes from the origin node unchecked: one past year 9999 (a peer or a
    /// node with a wrong clock) renders clamped to the last microsecond RFC 3339 can write,
    /// in every sink that ships envelopes, rather than panicking on every restart.
    #[test]
    fn a_commit_time_past_year_9999_renders_clamped_instead_of_panicking() {
        const LAST: &str = "9999-12-31T23:59:59.999999Z";
        for us in [253_402_300_800_000_000, 253_402_300_799_999_999, i64::MAX] {
            assert_eq!(rfc3339_us(us), LAST, "{us}");
        }
        let mut times = TsText::default();
        assert_eq!(times.render(253_402_300_800_000_123), LAST);
        assert_eq!(times.render(253_402_300_800_000_456), LAST);
        assert_eq!(
            times.render(1_700_000_000_000_001),
            "2023-11-14T22:13:20.000001Z"
        );
        let uuid = uuid::Uuid::from_bytes([5; 16]);
        let txn = Transaction {
            offset: Offset::new(3).unwrap(),
            gtid: Gtid::new(uuid, 3).unwrap(),
            timestamp_us: 253_402_300_800_000_000,
            ops: sample_ops(),
        };
        let batch = crate::sink::Batch {
            source: uuid,
            items: vec![Item::Txn(txn.clone())],
            checkpoint: vec![],
        };
        use crate::sink::nats::message::{Per, messages};
        for per in [Per::Txn, Per::Op] {
            let built = messages(&batch, "p", "t.{tree}", per);
            assert!(!built.is_empty());
            for m in &built {
                let text = String::from_utf8_lossy(&m.payload);
                assert!(text.contains(LAST), "{per:?}: {text}");
            }
        }
        let mut lines = Vec::new();
        write_lines(&Item::Txn(txn), uuid, &mut lines);
        assert!(String::from_utf8_lossy(&lines).contains(LAST));
    }

    #[test]
    fn written_lines_are_the_envelopes_serialized() {
        let uuid = uuid::Uuid::from_bytes([4; 16]);
        let txn = Transaction {
            offset: Offset::new(7).unwrap(),
            gtid: Gtid::new(uuid, 7).unwrap(),
            timestamp_us: 1_700_000_000_123_456,
            ops: sample_ops(),
        };
        let items = [
            Item::Txn(txn.clone()),
            Item::Record(CopyRecord::filtered(txn.clone(), |op| op.tree() != "t")),
            Item::Ops(txn.ops.clone()),
            Item::Chunk {
                tree: "t".into(),
                merge_operator: None,
                from: vec![],
                to: None,
                entries: tideline_wal::PackedEntries::from_pairs(vec![
                    (b"a".to_vec(), b"1".to_vec()),
                    (vec![0xfe], vec![0xfd]),
                ])
                .unwrap(),
            },
            Item::Chunk {
                tree: "c\"q".into(),
                merge_operator: Some("json-merge-patch".into()),
                from: vec![],
                to: None,
                entries: tideline_wal::PackedEntries::from_pairs(vec![(
                    b"n".to_vec(),
                    b"{}".to_vec(),
                )])
                .unwrap(),
            },
        ];
        for item in &items {
            let mut want = Vec::new();
            for_each_envelope(item, uuid, |v| {
                serde_json::to_writer(&mut want, &v).unwrap();
                want.push(b'\n');
            });
            let mut got = Vec::new();
            write_lines(item, uuid, &mut got);
            assert_eq!(
                String::from_utf8(got).unwrap(),
                String::from_utf8(want).unwrap()
            );
        }
    }
}
