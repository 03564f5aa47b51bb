//! JSON rendering of log records, shared by `log dump` (and later `tail`): one object per
//! transaction, `{"offset":N,"gtid":"uuid:n","ts":"RFC 3339","ops":[...]}`. Keys and values
//! that are not UTF-8 appear as `key_b64` / `value_b64`.

use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{Map, Value, json};
use tideline_wal::{Op, Transaction};

/// RFC 3339 text (UTC, microseconds) for a timestamp in microseconds since the Unix epoch.
pub fn rfc3339_us(timestamp_us: i64) -> String {
    let t = if timestamp_us >= 0 {
        UNIX_EPOCH + Duration::from_micros(timestamp_us as u64)
    } else {
        UNIX_EPOCH
    };
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

/// One op as a JSON object.
pub fn op_json(op: &Op) -> Value {
    let mut obj = Map::new();
    let (name, tree) = match op {
        Op::Put { tree, .. } => ("put", tree),
        Op::Delete { tree, .. } => ("delete", tree),
        Op::Merge { tree, .. } => ("merge", tree),
        Op::CreateTree { tree, .. } => ("create_tree", tree),
        Op::DropTree { tree } => ("drop_tree", tree),
        Op::CreateIndex { tree, .. } => ("create_index", tree),
        Op::DropIndex { tree, .. } => ("drop_index", tree),
    };
    obj.insert("op".into(), Value::String(name.into()));
    obj.insert("tree".into(), Value::String(tree.clone()));
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
