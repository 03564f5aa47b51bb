//! Built-in merge operators.
//!
//! A merge is logged as its operand, not its result, and resolved when the transaction is
//! applied to the store. Every node applies the same log in the same order with the same
//! operator, so every node computes the same result. For that, resolution is a pure function
//! of (existing value, operand) that never fails: a malformed *operand* is refused when the
//! merge is submitted, and an existing value the operator cannot read is given a fixed,
//! documented meaning instead of an error.

use std::fmt;
use std::str::FromStr;

use serde_json::Value;

/// A merge operator, registered on a tree by name when the tree is created.
///
/// persisted: the names are written into the log (`Op::CreateTree`) and the store's catalog;
/// changes must stay backward compatible (a name, once used, keeps its meaning).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MergeOperator {
    /// `add`: values and operands are signed 64-bit integers in decimal text (`"42"`, `"-7"`).
    /// A missing value counts as 0, and so does an existing value that is not a decimal
    /// integer. The sum saturates at `i64::MIN`/`i64::MAX`.
    Add,
    /// `append`: the operand's bytes are appended to the existing value (missing = empty).
    Append,
    /// `json-merge-patch`: the operand is a JSON document applied as an RFC 7386 merge patch.
    /// A missing value, or one that is not JSON, counts as `null`. The result is compact JSON.
    JsonMergePatch,
    /// `max`: like `add`, decimal `i64`; the result is the larger of the two. A missing or
    /// non-integer existing value is replaced by the operand.
    Max,
}

impl MergeOperator {
    /// Every built-in operator.
    pub const ALL: [MergeOperator; 4] = [
        MergeOperator::Add,
        MergeOperator::Append,
        MergeOperator::JsonMergePatch,
        MergeOperator::Max,
    ];

    /// The operator's registered name.
    pub fn name(self) -> &'static str {
        match self {
            MergeOperator::Add => "add",
            MergeOperator::Append => "append",
            MergeOperator::JsonMergePatch => "json-merge-patch",
            MergeOperator::Max => "max",
        }
    }

    /// Looks an operator up by its registered name.
    pub fn from_name(name: &str) -> Option<MergeOperator> {
        MergeOperator::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Checks an operand before it is logged. `Err` carries what is wrong with it.
    pub fn check_operand(self, operand: &[u8]) -> Result<(), String> {
        match self {
            MergeOperator::Add | MergeOperator::Max => {
                parse_i64(operand).map(|_| ()).ok_or_else(|| {
                    "the operand must be a signed 64-bit integer in decimal text, like `-12`".into()
                })
            }
            MergeOperator::Append => Ok(()),
            MergeOperator::JsonMergePatch => serde_json::from_slice::<Value>(operand)
                .map(|_| ())
                .map_err(|e| format!("the operand is not JSON: {e}")),
        }
    }

    /// Resolves one merge: the new value from the existing one and the operand. Pure and
    /// infallible, so every node that applies the log computes the same bytes.
    pub fn resolve(self, existing: Option<&[u8]>, operand: &[u8]) -> Vec<u8> {
        match self {
            MergeOperator::Add => {
                let base = existing.and_then(parse_i64).unwrap_or(0);
                let add = parse_i64(operand).unwrap_or(0);
                base.saturating_add(add).to_string().into_bytes()
            }
            MergeOperator::Max => {
                let Some(op) = parse_i64(operand) else {
                    // Refused on submission; a stored log never holds one. Keep the value.
                    return existing.map(<[u8]>::to_vec).unwrap_or_default();
                };
                match existing.and_then(parse_i64) {
                    Some(base) => base.max(op).to_string().into_bytes(),
                    None => op.to_string().into_bytes(),
                }
            }
            MergeOperator::Append => {
                let mut out = existing.map(<[u8]>::to_vec).unwrap_or_default();
                out.extend_from_slice(operand);
                out
            }
            MergeOperator::JsonMergePatch => {
                let mut target = existing
                    .and_then(|v| serde_json::from_slice::<Value>(v).ok())
                    .unwrap_or(Value::Null);
                match serde_json::from_slice::<Value>(operand) {
                    Ok(patch) => merge_patch(&mut target, &patch),
                    // Refused on submission; a stored log never holds one. Keep the value.
                    Err(_) => return existing.map(<[u8]>::to_vec).unwrap_or_default(),
                }
                serde_json::to_vec(&target).unwrap_or_default()
            }
        }
    }
}

impl fmt::Display for MergeOperator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MergeOperator {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MergeOperator::from_name(s).ok_or_else(|| {
            format!(
                "unknown merge operator `{s}`; built-ins are {}",
                known_operators()
            )
        })
    }
}

/// How much longer than its input (existing value and operands) a `json-merge-patch` result
/// may be: it is serde_json's compact form, where strings, literals and layout never grow but
/// a number may (`1e15` is written back as `1000000000000000.0`, 18 bytes for 4).
pub(crate) const JSON_GROWTH_MAX: u64 = 6;

/// The built-in operator names, comma-separated, for error messages.
pub(crate) fn known_operators() -> String {
    MergeOperator::ALL
        .iter()
        .map(|m| m.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Strict decimal `i64`: optional `-` or `+`, then ASCII digits, nothing else.
pub(crate) fn parse_i64(bytes: &[u8]) -> Option<i64> {
    std::str::from_utf8(bytes).ok()?.parse::<i64>().ok()
}

/// RFC 7386 MergePatch(Target, Patch).
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(map) = target {
        for (name, value) in patch {
            if value.is_null() {
                map.remove(name);
            } else {
                merge_patch(map.entry(name.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_round_trip() {
        for m in MergeOperator::ALL {
            assert_eq!(MergeOperator::from_name(m.name()), Some(m));
        }
        assert!("sum".parse::<MergeOperator>().is_err());
    }

    #[test]
    fn add_and_max() {
        let add = MergeOperator::Add;
        assert_eq!(add.resolve(None, b"5"), b"5");
        assert_eq!(add.resolve(Some(b"5"), b"-7"), b"-2");
        assert_eq!(add.resolve(Some(b"junk"), b"1"), b"1");
        assert_eq!(
            add.resolve(Some(i64::MAX.to_string().as_bytes()), b"1"),
            i64::MAX.to_string().as_bytes()
        );
        assert!(add.check_operand(b"1.5").is_err());
        let max = MergeOperator::Max;
        assert_eq!(max.resolve(None, b"3"), b"3");
        assert_eq!(max.resolve(Some(b"9"), b"3"), b"9");
        assert_eq!(max.resolve(Some(b"x"), b"3"), b"3");
    }

    /// JSON_GROWTH_MAX bounds what a number, the one JSON text serde_json writes back longer,
    /// becomes: the shortest numbers of every exponent, where the growth is largest.
    #[test]
    fn json_results_grow_at_most_json_growth_max() {
        let mut largest = 0.0f64;
        for exp in -330..330 {
            for n in [format!("9e{exp}"), format!("-9e{exp}"), format!("1e{exp}")] {
                let out = MergeOperator::JsonMergePatch.resolve(None, n.as_bytes());
                if out == b"null" {
                    continue; // out of range: the operand is refused on submission
                }
                largest = largest.max(out.len() as f64 / n.len() as f64);
                assert!(
                    out.len() as u64 <= JSON_GROWTH_MAX * n.len() as u64,
                    "{n} -> {}",
                    String::from_utf8_lossy(&out)
                );
            }
        }
        assert!(largest > 4.0, "the worst case was not met: {largest}");
        for (n, want) in [("-0", "-0.0"), ("1e15", "1000000000000000.0")] {
            assert_eq!(
                MergeOperator::JsonMergePatch.resolve(None, n.as_bytes()),
                want.as_bytes()
            );
        }
    }

    #[test]
    fn rfc7386_examples() {
        // From RFC 7386 appendix A.
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (target, patch, want) in cases {
            let mut t = target.clone();
            merge_patch(&mut t, &patch);
            assert_eq!(t, want, "{target} + {patch}");
        }
    }
}
