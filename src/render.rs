//! JSON rendering of log records, shared by `log dump` (and later `tail`): one object per
//! transaction, `{"offset":N,"gtid":"uuid:n","ts":"RFC 3339","ops":[...]}`. Keys and values
//! that are not UTF-8 appear as `key_b64` / `value_b64`.

use serde_json::{Map, Value, json};
use tideline_wal::{Op, Transaction};

// One text form for times and bytes in every JSON Tideline prints: the change envelope's.
pub use tideline_connectors::envelope::{put_bytes, rfc3339_us};

/// One op as a JSON object.
pub fn op_json(op: &Op) -> Value {
    let mut obj = Map::new();
    let (name, tree) = (op.kind(), op.tree());
    obj.insert("op".into(), Value::String(name.into()));
    obj.insert("tree".into(), Value::String(tree.to_owned()));
    match op {
        Op::Put {
            key, value, before, ..
        } => {
            put_bytes(&mut obj, "key", key);
            put_bytes(&mut obj, "value", value);
            if let Some(b) = before {
                put_bytes(&mut obj, "before", b);
            }
        }
        Op::Delete { key, before, .. } => {
            put_bytes(&mut obj, "key", key);
            if let Some(b) = before {
                put_bytes(&mut obj, "before", b);
            }
        }
        Op::Merge { key, operand, .. } => {
            put_bytes(&mut obj, "key", key);
            put_bytes(&mut obj, "value", operand);
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
    Value::Object(obj)
}

/// One transaction as a JSON object.
pub fn txn_json(txn: &Transaction) -> Value {
    json!({
        "offset": txn.offset.get(),
        "gtid": txn.gtid.to_string(),
        "ts": rfc3339_us(txn.timestamp_us),
        "ops": txn.ops.iter().map(op_json).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tideline_wal::{Gtid, Offset};

    #[test]
    fn renders_the_documented_shape() {
        let txn = Transaction {
            offset: Offset::new(3).unwrap(),
            gtid: "3e11fa47-71ca-11e1-9e33-c80aa9429562:7"
                .parse::<Gtid>()
                .unwrap(),
            timestamp_us: 1_700_000_000_123_456,
            ops: vec![
                Op::Put {
                    tree: "default".into(),
                    key: b"k".to_vec(),
                    value: vec![0xff, 0x00],
                    before: None,
                },
                Op::Delete {
                    tree: "t".into(),
                    key: b"gone".to_vec(),
                    before: None,
                },
                Op::CreateIndex {
                    tree: "t".into(),
                    name: "by_email".into(),
                    paths: vec!["/email".into()],
                    unique: true,
                },
                Op::DropIndex {
                    tree: "t".into(),
                    name: "by_email".into(),
                },
            ],
        };
        let text = txn_json(&txn).to_string();
        assert_eq!(
            text,
            concat!(
                r#"{"offset":3,"gtid":"3e11fa47-71ca-11e1-9e33-c80aa9429562:7","#,
                r#""ts":"2023-11-14T22:13:20.123456Z","ops":[{"op":"put","tree":"default","#,
                r#""key":"k","value_b64":"/wA="},{"op":"delete","tree":"t","key":"gone"},"#,
                r#"{"op":"create_index","tree":"t","name":"by_email","paths":["/email"],"#,
                r#""unique":true},{"op":"drop_index","tree":"t","name":"by_email"}]}"#
            )
        );
    }
}
