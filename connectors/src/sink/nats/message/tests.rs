use super::*;
use crate::sink::CopyRecord;
use serde_json::{Value, json};
use tideline_wal::{Gtid, Offset};

/// The messages of `batch` built as JSON values and serialized: the shapes the direct
/// writer must reproduce byte for byte.
fn by_value(
    batch: &Batch,
    pipeline: &str,
    template: &str,
    per: Per,
) -> Vec<(String, String, Vec<u8>)> {
    let mut out = Vec::new();
    let uuid = batch.source;
    let to_bytes = |v: &Value| serde_json::to_vec(v).unwrap();
    for item in &batch.items {
        match item {
            Item::Txn(t) => {
                let source = envelope::Source {
                    server_uuid: uuid,
                    txn: Some(t),
                };
                let gtid = t.gtid.to_string();
                match per {
                    Per::Txn => {
                        let changes: Vec<Value> = t
                            .ops
                            .iter()
                            .map(|op| envelope::op_envelope(op, source))
                            .collect();
                        let payload = json!({
                            "gtid": gtid,
                            "offset": t.offset.get(),
                            "ts": envelope::rfc3339_us(t.timestamp_us),
                            "changes": changes,
                        });
                        out.push((
                            subject(template, txn_tree(t)),
                            format!("{pipeline}/{gtid}"),
                            to_bytes(&payload),
                        ));
                    }
                    Per::Op => {
                        for (i, op) in t.ops.iter().enumerate() {
                            out.push((
                                subject(template, op_tree(op)),
                                format!("{pipeline}/{gtid}:{i}"),
                                to_bytes(&envelope::op_envelope(op, source)),
                            ));
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
                for (k, v) in entries {
                    out.push((
                        subject(template, tree),
                        format!(
                            "{pipeline}/boot:{uuid}:{}",
                            digest(&[tree.as_bytes(), k, v])
                        ),
                        to_bytes(&envelope::chunk_row_envelope(
                            tree,
                            merge_operator.as_deref(),
                            k,
                            v,
                            uuid,
                        )),
                    ));
                }
            }
            Item::Record(r) => {
                let source = envelope::Source {
                    server_uuid: uuid,
                    txn: Some(&r.txn),
                };
                for (i, op) in r.indexed_ops() {
                    out.push((
                        subject(template, op_tree(op)),
                        format!("{pipeline}/{}:{i}", r.txn.gtid),
                        to_bytes(&envelope::op_envelope(op, source)),
                    ));
                }
            }
            Item::Ops(ops) => {
                let source = envelope::Source {
                    server_uuid: uuid,
                    txn: None,
                };
                for (i, op) in ops.iter().enumerate() {
                    let step = digest(&[&batch.checkpoint]);
                    let payload = to_bytes(&envelope::op_envelope(op, source));
                    out.push((
                        subject(template, op_tree(op)),
                        format!("{pipeline}/boot:{uuid}:{step}:{i}:{}", digest(&[&payload])),
                        payload,
                    ));
                }
            }
        }
    }
    out
}

#[test]
fn the_direct_writer_gives_the_envelopes_json_values_give() {
    let uuid = uuid::Uuid::from_bytes([9; 16]);
    let ops = envelope::sample_ops();
    let batch = Batch {
        source: uuid,
        items: vec![
            txn(uuid, 5, ops.clone()),
            txn(uuid, 6, vec![put("users", "a")]),
            Item::Txn(Transaction {
                offset: Offset::new(7).unwrap(),
                gtid: Gtid::new(uuid, 7).unwrap(),
                timestamp_us: 1_700_000_000_123_456,
                ops: vec![],
            }),
            Item::Chunk {
                tree: "t.x".into(),
                merge_operator: None,
                from: vec![],
                to: None,
                entries: tideline_wal::PackedEntries::from_pairs(vec![
                    (b"a".to_vec(), b"1".to_vec()),
                    (vec![0xfe], vec![0xfd]),
                ])
                .unwrap(),
            },
            Item::Record(CopyRecord::filtered(
                Transaction {
                    offset: Offset::new(8).unwrap(),
                    gtid: Gtid::new(uuid, 8).unwrap(),
                    timestamp_us: 1_700_000_000_654_321,
                    ops: ops.clone(),
                },
                |op| op.tree() != "t",
            )),
            Item::Ops(ops),
        ],
        checkpoint: b"not a bootstrap checkpoint".to_vec(),
    };
    for per in [Per::Txn, Per::Op] {
        let mut builder = Builder::new("p", "cdc.{tree}", per);
        // Twice through one builder: its kept subjects and buffer size change nothing.
        for _ in 0..2 {
            let got: Vec<_> = builder
                .messages(&batch)
                .into_iter()
                .map(|m| (m.subject.to_string(), m.id, m.payload.to_vec()))
                .collect();
            let want = by_value(&batch, "p", "cdc.{tree}", per);
            assert_eq!(got.len(), want.len(), "{per:?}");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.0, w.0, "{per:?}");
                assert_eq!(g.1, w.1, "{per:?}");
                assert_eq!(
                    String::from_utf8_lossy(&g.2),
                    String::from_utf8_lossy(&w.2),
                    "{per:?}"
                );
            }
        }
    }
}

/// The builder keeps the uuid's and the second's text between transactions: a batch
/// whose transactions change origin, second and microseconds in every order must still
/// give what rendering each from scratch gives.
#[test]
fn kept_gtid_and_time_texts_match_rendering_each_afresh() {
    let server = uuid::Uuid::from_bytes([1; 16]);
    let other = uuid::Uuid::from_bytes([2; 16]);
    let cases: [(uuid::Uuid, u64, i64); 9] = [
        (server, 1, 1_700_000_000_000_000),
        (server, 9, 1_700_000_000_000_001),
        (other, 10, 1_700_000_000_999_999),
        (server, 99, 1_700_000_001_000_000),
        (other, 100, 1_700_000_000_500_000),
        (other, u64::MAX, 1_700_000_000_500_000),
        (server, 12_345_678_901, -5),
        (server, 7, 0),
        (other, 8, 253_402_300_799_999_999),
    ];
    let items = cases
        .iter()
        .enumerate()
        .map(|(i, &(origin, seq, ts))| {
            Item::Txn(Transaction {
                offset: Offset::new(i as u64 + 1).unwrap(),
                gtid: Gtid::new(origin, seq).unwrap(),
                timestamp_us: ts,
                ops: vec![put("t", "k")],
            })
        })
        .collect();
    let batch = Batch {
        source: server,
        items,
        checkpoint: vec![],
    };
    for per in [Per::Txn, Per::Op] {
        let got: Vec<_> = Builder::new("p", "s.{tree}", per)
            .messages(&batch)
            .into_iter()
            .map(|m| (m.subject.to_string(), m.id, m.payload.to_vec()))
            .collect();
        let want = by_value(&batch, "p", "s.{tree}", per);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.1, w.1, "{per:?}");
            assert_eq!(
                String::from_utf8_lossy(&g.2),
                String::from_utf8_lossy(&w.2),
                "{per:?}"
            );
        }
    }
}

fn put(tree: &str, key: &str) -> Op {
    Op::Put {
        tree: tree.into(),
        key: key.as_bytes().to_vec(),
        value: b"v".to_vec(),
        before: None,
    }
}

fn txn(uuid: uuid::Uuid, n: u64, ops: Vec<Op>) -> Item {
    Item::Txn(Transaction {
        offset: Offset::new(n).unwrap(),
        gtid: Gtid::new(uuid, n).unwrap(),
        timestamp_us: 1_700_000_000_000_000,
        ops,
    })
}

#[test]
fn a_transaction_is_one_message_with_its_gtid_as_id() {
    let uuid = uuid::Uuid::from_bytes([7; 16]);
    let batch = Batch {
        source: uuid,
        items: vec![
            txn(uuid, 3, vec![put("users", "a"), put("users", "b")]),
            txn(uuid, 4, vec![put("users", "c"), put("orders", "d")]),
        ],
        checkpoint: vec![],
    };
    let m = messages(&batch, "users-feed", "tideline.{tree}", Per::Txn);
    assert_eq!(m.len(), 2);
    assert_eq!(m[0].id, format!("users-feed/{uuid}:3"));
    assert_eq!(m[0].subject.as_str(), "tideline.users");
    assert_eq!(m[1].subject.as_str(), "tideline._multi");
    let p: Value = serde_json::from_slice(&m[0].payload).unwrap();
    assert_eq!(p["gtid"], format!("{uuid}:3"));
    assert_eq!(p["offset"], 3);
    assert_eq!(p["ts"], "2023-11-14T22:13:20.000000Z");
    assert_eq!(p["changes"].as_array().unwrap().len(), 2);
    assert_eq!(p["changes"][1]["key"], "b");
}

#[test]
fn per_op_messages_carry_the_gtid_and_the_change_index() {
    let uuid = uuid::Uuid::from_bytes([7; 16]);
    let batch = Batch {
        source: uuid,
        items: vec![txn(uuid, 9, vec![put("a.b", "k1"), put("c", "k2")])],
        checkpoint: vec![],
    };
    let m = messages(&batch, "feed", "cdc.{tree}.changes", Per::Op);
    let ids: Vec<_> = m.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(
        ids,
        [format!("feed/{uuid}:9:0"), format!("feed/{uuid}:9:1")]
    );
    assert_eq!(m[0].subject.as_str(), "cdc.a_b.changes");
    assert_eq!(m[1].subject.as_str(), "cdc.c.changes");
    let p: Value = serde_json::from_slice(&m[1].payload).unwrap();
    assert_eq!(p["key"], "k2");
    assert_eq!(p["source"]["gtid"], format!("{uuid}:9"));
}

#[test]
fn a_resent_chunk_has_the_same_ids_and_a_changed_row_a_new_one() {
    let uuid = uuid::Uuid::from_bytes([8; 16]);
    let chunk = |v: &[u8]| Batch {
        source: uuid,
        items: vec![Item::Chunk {
            tree: "t".into(),
            merge_operator: None,
            from: vec![],
            to: None,
            entries: tideline_wal::PackedEntries::from_pairs(vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), v.to_vec()),
            ])
            .unwrap(),
        }],
        checkpoint: b"{}".to_vec(),
    };
    let first = messages(&chunk(b"2"), "p", "x.{tree}", Per::Txn);
    let again = messages(&chunk(b"2"), "p", "x.{tree}", Per::Txn);
    let changed = messages(&chunk(b"3"), "p", "x.{tree}", Per::Txn);
    assert_eq!(first, again);
    assert_eq!(first[0].id, changed[0].id);
    assert_ne!(first[1].id, changed[1].id);
    assert_ne!(first[0].id, first[1].id);
    assert!(first[0].id.starts_with(&format!("p/boot:{uuid}:")));
}

/// A step of a bootstrap copy at `offset` holding `ops`, in the checkpoint the copy stores
/// with it (the cursor at `tree`).
fn copy_step(uuid: uuid::Uuid, offset: u64, tree: &str, ops: Vec<Op>) -> Batch {
    let progress = serde_json::from_value(json!({
        "server_uuid": uuid, "after_offset": offset, "epoch": 3, "tree": tree,
        "key_hex": "", "tree_done": true, "trees_done": 1, "chunks": 1, "keys": 5,
        "bytes": 50, "keys_estimate": 10, "bytes_estimate": 100, "records": 0,
        "resumes": 0,
    }))
    .unwrap();
    Batch {
        source: uuid,
        items: vec![Item::Ops(ops)],
        checkpoint: PipelineCheckpoint::Bootstrap(progress).encode(),
    }
}

/// A copy step at `offset` (cursor at `tree`) holding live `records`, each reduced to the
/// ops `applies` accepts.
fn copy_records(
    uuid: uuid::Uuid,
    offset: u64,
    tree: &str,
    records: Vec<Transaction>,
    applies: impl Fn(&Op) -> bool,
) -> Batch {
    let mut batch = copy_step(uuid, offset, tree, vec![]);
    batch.items = records
        .into_iter()
        .map(|r| Item::Record(CopyRecord::filtered(r, &applies)))
        .collect();
    batch
}

fn tree_events(tree: &str) -> Vec<Op> {
    vec![
        Op::CreateTree {
            tree: tree.into(),
            merge_operator: None,
        },
        Op::CreateIndex {
            tree: tree.into(),
            name: "by_i".into(),
            paths: vec!["/i".into()],
            unique: false,
        },
    ]
}

fn ids(batch: &Batch, pipeline: &str, per: Per) -> Vec<String> {
    messages(batch, pipeline, "t.{tree}", per)
        .into_iter()
        .map(|m| m.id)
        .collect()
}

/// Two pipelines on one stream publish the same transaction (or the same row) filtered
/// each its own way: no id of one may be an id of the other, or the stream drops it.
#[test]
fn two_pipelines_never_share_an_id() {
    let uuid = uuid::Uuid::from_bytes([5; 16]);
    let users = Batch {
        source: uuid,
        items: vec![txn(uuid, 4, vec![put("users", "a")])],
        checkpoint: vec![],
    };
    let orders = Batch {
        source: uuid,
        items: vec![txn(uuid, 4, vec![put("orders", "b")])],
        checkpoint: vec![],
    };
    for per in [Per::Txn, Per::Op] {
        let a = ids(&users, "users-feed", per);
        let b = ids(&orders, "orders-feed", per);
        assert!(a.iter().all(|id| !b.contains(id)), "{per:?}: {a:?} {b:?}");
        // A pipeline whose name is another's with `/...` added: still apart.
        let c = ids(&orders, "users-feed/x", per);
        assert!(a.iter().all(|id| !c.contains(id)), "{per:?}: {a:?} {c:?}");
        // The same batch again (a retry, a restart): the same ids.
        assert_eq!(a, ids(&users, "users-feed", per));
    }
    let chunk = Batch {
        source: uuid,
        items: vec![Item::Chunk {
            tree: "users".into(),
            merge_operator: None,
            from: vec![],
            to: None,
            entries: tideline_wal::PackedEntries::from_pairs(vec![(b"a".to_vec(), b"1".to_vec())])
                .unwrap(),
        }],
        checkpoint: vec![],
    };
    assert_ne!(ids(&chunk, "a", Per::Txn), ids(&chunk, "b", Per::Txn));
}

/// On an idle source every step of a copy is at one offset: the tree events of the
/// second tree must not get the first tree's ids, nor those of a live change of the same
/// step position; the same step sent again (a resumed copy) keeps its ids.
#[test]
fn the_tree_events_of_a_copy_get_an_id_per_tree() {
    let uuid = uuid::Uuid::from_bytes([6; 16]);
    let first = ids(
        &copy_step(uuid, 40, "", tree_events("orders")),
        "p",
        Per::Txn,
    );
    let second = ids(
        &copy_step(uuid, 40, "orders", tree_events("users")),
        "p",
        Per::Txn,
    );
    let live = ids(
        &copy_step(uuid, 40, "orders", vec![put("users", "k")]),
        "p",
        Per::Txn,
    );
    assert_eq!(first.len(), 2);
    assert_ne!(first[0], first[1]);
    assert!(
        first.iter().all(|id| !second.contains(id)),
        "{first:?} {second:?}"
    );
    assert!(
        second.iter().all(|id| !live.contains(id)),
        "{second:?} {live:?}"
    );
    assert!(
        first[0].starts_with(&format!("p/boot:{uuid}:3:40:0:")),
        "{first:?}"
    );
    let again = ids(
        &copy_step(uuid, 40, "orders", tree_events("users")),
        "p",
        Per::Op,
    );
    assert_eq!(second, again);
}

/// A record the source committed while a copy ran reaches the sink in a copy step; a copy
/// resumed after a crash (between the acks and the checkpoint) sends it again in a step
/// cut differently: other records around it, another progress, and only the ops the
/// resumed cursor covers. Its messages must keep their ids, taken from the record's GTID
/// and each op's place in the record, or the stream stores its ops twice (a merge counted
/// twice).
#[test]
fn a_copy_time_record_keeps_its_ids_however_the_copy_cuts_it() {
    let uuid = uuid::Uuid::from_bytes([4; 16]);
    let merge = Op::Merge {
        tree: "cnt".into(),
        key: b"z".to_vec(),
        operand: b"1".to_vec(),
    };
    let record = |n: u64, ops: Vec<Op>| Transaction {
        offset: Offset::new(n).unwrap(),
        gtid: Gtid::new(uuid, n).unwrap(),
        timestamp_us: 1_700_000_000_000_000,
        ops,
    };
    // First sent with the record before it, the copy past all of `cnt`; again with the
    // record after it, the resumed copy's cursor at `cnt`/`m`: the merge on `z` is not
    // covered (the chunk it reads next holds its effect).
    let first = copy_records(
        uuid,
        7,
        "cnt",
        vec![
            record(6, vec![put("cnt", "k6")]),
            record(7, vec![merge.clone(), put("cnt", "b")]),
        ],
        |_| true,
    );
    let again = copy_records(
        uuid,
        8,
        "cnt",
        vec![
            record(7, vec![merge, put("cnt", "b")]),
            record(8, vec![put("cnt", "k8")]),
        ],
        |op| op.key() < Some(&b"m"[..]),
    );
    for per in [Per::Txn, Per::Op] {
        let of_7 = |batch: &Batch| -> Vec<(String, String)> {
            messages(batch, "p", "t.{tree}", per)
                .into_iter()
                .map(|m| {
                    let e: Value = serde_json::from_slice(&m.payload).unwrap();
                    (e["key"].as_str().unwrap_or_default().to_owned(), m.id)
                })
                .filter(|(k, _)| k == "z" || k == "b")
                .collect()
        };
        let (first, again) = (of_7(&first), of_7(&again));
        assert_eq!(
            first,
            [
                ("z".to_owned(), format!("p/{uuid}:7:0")),
                ("b".to_owned(), format!("p/{uuid}:7:1"))
            ],
            "{per:?}: ids from the record's GTID and the op's place in it"
        );
        assert_eq!(again, first[1..], "{per:?}: the same op, the same id");
    }
}

#[test]
fn tree_names_become_one_subject_token() {
    assert_eq!(subject_token("a.b c*>"), "a_b_c__");
    assert_eq!(subject_token(""), "_");
    assert_eq!(subject("fixed", "users"), "fixed");
}
