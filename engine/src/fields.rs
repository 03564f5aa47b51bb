//! Reading the indexed fields of a JSON document without building the document.
//!
//! Owns: [`Fields`], a set of JSON pointers compiled into a trie, and its one-pass extraction
//! ([`Fields::extract`]): the document is parsed by serde_json's own parser, which checks all
//! of it (syntax, UTF-8, escapes, number range, nesting depth) exactly as a parse into a
//! `serde_json::Value` does, but only the values at the pointers are built; everything else
//! is checked and dropped without an allocation.
//!
//! The result is, by construction, what `serde_json::from_slice::<Value>(doc)` followed by
//! `Value::pointer(path)` and `index::scalar_bytes` gives: `None` for a document that is not
//! JSON; for each pointer the scalar's component bytes, or `None` when the path is missing or
//! holds an object or array. Duplicate object keys keep the last value, as `Value` does. A
//! set of pointers where one is a prefix of another (or the whole document, `""`) is not
//! compiled: it falls back to the full parse, which gives the same answer.
//!
//! Must never: accept a document that the full parse refuses, or the reverse (the
//! differential test below, `walk_equals_full_parse`, holds the two together).

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// One step of a pointer, unescaped as `Value::pointer` does (`~1` → `/`, then `~0` → `~`).
struct Node {
    token: String,
    /// The array index the token names, by `Value::pointer`'s rule (no `+`, no leading 0).
    index: Option<usize>,
    children: Vec<usize>,
    /// The slot a pointer ending here fills; set only on leaves.
    slot: Option<usize>,
    /// Every slot at or below this node (cleared when a duplicate key replaces the subtree).
    slots_below: Vec<usize>,
}

/// JSON pointers compiled for one pass over a document. See the module docs.
pub(crate) struct Fields {
    paths: Vec<String>,
    /// Node 0 is the root; empty when `full_parse`.
    nodes: Vec<Node>,
    /// One pointer is a prefix of another (or is `""`): extract through a full parse.
    full_parse: bool,
}

impl fmt::Debug for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fields")
            .field("paths", &self.paths)
            .field("full_parse", &self.full_parse)
            .finish_non_exhaustive()
    }
}

fn parse_index(s: &str) -> Option<usize> {
    if s.starts_with('+') || (s.starts_with('0') && s.len() != 1) {
        return None;
    }
    s.parse().ok()
}

fn tokens(path: &str) -> Vec<String> {
    path.split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

impl Fields {
    /// Compiles `paths` (JSON pointers, checked by `index::is_valid_json_pointer`); slot `i`
    /// of an extraction is `paths[i]`.
    pub(crate) fn new(paths: &[String]) -> Fields {
        let mut f = Fields {
            paths: paths.to_vec(),
            nodes: Vec::new(),
            full_parse: false,
        };
        if !f.compile() {
            f.nodes.clear();
            f.full_parse = true;
        }
        f
    }

    /// Builds the trie; `false` when a pointer is `""`, does not start with `/`, or is a
    /// prefix of another (then the full parse answers).
    fn compile(&mut self) -> bool {
        self.nodes.push(Node {
            token: String::new(),
            index: None,
            children: Vec::new(),
            slot: None,
            slots_below: Vec::new(),
        });
        for (slot, path) in self.paths.iter().enumerate() {
            if !path.starts_with('/') {
                return false;
            }
            let mut at = 0;
            self.nodes[0].slots_below.push(slot);
            for token in tokens(path) {
                if self.nodes[at].slot.is_some() {
                    return false; // an earlier pointer ends above this one
                }
                let found = self.nodes[at]
                    .children
                    .iter()
                    .copied()
                    .find(|&c| self.nodes[c].token == token);
                at = match found {
                    Some(c) => c,
                    None => {
                        let c = self.nodes.len();
                        self.nodes.push(Node {
                            index: parse_index(&token),
                            token,
                            children: Vec::new(),
                            slot: None,
                            slots_below: Vec::new(),
                        });
                        self.nodes[at].children.push(c);
                        c
                    }
                };
                self.nodes[at].slots_below.push(slot);
            }
            if self.nodes[at].slot.is_some() || !self.nodes[at].children.is_empty() {
                return false; // the same pointer twice, or a prefix of an earlier one
            }
            self.nodes[at].slot = Some(slot);
        }
        true
    }

    /// The component bytes at each pointer (see the module docs); `None`: not JSON.
    pub(crate) fn extract(&self, doc: &[u8]) -> Option<Vec<Option<Vec<u8>>>> {
        if self.full_parse {
            let v: Value = serde_json::from_slice(doc).ok()?;
            return Some(
                self.paths
                    .iter()
                    .map(|p| v.pointer(p).and_then(crate::index::scalar_bytes))
                    .collect(),
            );
        }
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            self.walk(doc, s).then(|| {
                s.slots
                    .iter()
                    .map(|r| r.map(|(a, b)| s.buf[a..b].to_vec()))
                    .collect()
            })
        })
    }

    /// Appends to `entry` the component at each pointer, in order, as
    /// `index::push_component` writes it; `false` (with `entry` in an unspecified state) when
    /// the document is not JSON or a pointer is missing or holds an object or array. The
    /// same answer as [`Fields::extract`], without an allocation per value.
    pub(crate) fn extract_entry(&self, doc: &[u8], entry: &mut Vec<u8>) -> bool {
        if self.full_parse {
            let Some(values) = self.extract(doc) else {
                return false;
            };
            for v in &values {
                match v {
                    Some(b) => crate::index::push_component(entry, b),
                    None => return false,
                }
            }
            return true;
        }
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            if !self.walk(doc, s) {
                return false;
            }
            for r in &s.slots {
                match r {
                    Some((a, b)) => crate::index::push_component(entry, &s.buf[*a..*b]),
                    None => return false,
                }
            }
            true
        })
    }

    /// One pass over `doc` (compiled pointers only), leaving each slot's bytes in `s`;
    /// `false`: not JSON.
    fn walk(&self, doc: &[u8], s: &mut Scratch) -> bool {
        if s.buf.capacity() > SCRATCH_KEEP_BYTES {
            // One huge indexed value does not pin its buffer to the thread for good.
            s.buf = Vec::new();
        }
        s.buf.clear();
        s.slots.clear();
        s.slots.resize(self.paths.len(), None);
        let mut de = serde_json::Deserializer::from_slice(doc);
        let ok = Walk {
            fields: self,
            node: 0,
            out: s,
        }
        .deserialize(&mut de)
        .is_ok();
        ok && de.end().is_ok()
    }
}

/// Where one pass leaves the values it found: their bytes one after another in `buf`, and
/// for each slot the range of its value (`None`: missing or not a scalar). Kept per thread so
/// that an extraction allocates nothing once warm; a replaced value (a duplicate key) leaves
/// its bytes behind, unreferenced, until the next pass.
#[derive(Default)]
struct Scratch {
    buf: Vec<u8>,
    slots: Vec<Option<(usize, usize)>>,
}

/// The most scratch buffer a thread keeps between passes.
const SCRATCH_KEEP_BYTES: usize = 64 << 10;

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// Walks the value at trie node `node`, filling the slots below it.
struct Walk<'f, 'o> {
    fields: &'f Fields,
    node: usize,
    out: &'o mut Scratch,
}

impl<'de> DeserializeSeed<'de> for Walk<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        let fields = self.fields;
        let n = &fields.nodes[self.node];
        // The value replaces whatever an earlier duplicate key put below this node.
        for &s in &n.slots_below {
            self.out.slots[s] = None;
        }
        match n.slot {
            Some(slot) => {
                let start = self.out.buf.len();
                if d.deserialize_any(Leaf(&mut self.out.buf))? {
                    self.out.slots[slot] = Some((start, self.out.buf.len()));
                }
                Ok(())
            }
            None => d.deserialize_any(self),
        }
    }
}

/// The value at a pointer: a scalar's component bytes appended to the buffer (`true`), as
/// `index::scalar_bytes` renders the `Value` a full parse builds (a string's UTF-8, another
/// scalar's JSON text); an object or array is checked and gives `false`.
struct Leaf<'b>(&'b mut Vec<u8>);

impl Leaf<'_> {
    fn number<E: de::Error>(self, n: serde_json::Number) -> Result<bool, E> {
        use std::io::Write as _;
        write!(self.0, "{n}").map_err(E::custom)?;
        Ok(true)
    }
}

impl<'de> Visitor<'de> for Leaf<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, b: bool) -> Result<bool, E> {
        self.0.extend_from_slice(if b { b"true" } else { b"false" });
        Ok(true)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        self.number(v.into())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        self.number(v.into())
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<bool, E> {
        // Never produced by serde_json's parser as built here; what a `Value` holds if it were.
        match serde_json::to_value(v) {
            Ok(Value::Number(n)) => self.number(n),
            _ => Err(E::custom("number out of range")),
        }
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<bool, E> {
        match serde_json::to_value(v) {
            Ok(Value::Number(n)) => self.number(n),
            _ => Err(E::custom("number out of range")),
        }
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<bool, E> {
        // As `Value` does: a float that is not finite would be `null`.
        match serde_json::Number::from_f64(v) {
            Some(n) => self.number(n),
            None => self.visit_unit(),
        }
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        self.0.extend_from_slice(v.as_bytes());
        Ok(true)
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        self.0.extend_from_slice(b"null");
        Ok(true)
    }
    fn visit_none<E: de::Error>(self) -> Result<bool, E> {
        self.visit_unit()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<bool, A::Error> {
        Check.visit_seq(seq).map(|()| false)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<bool, A::Error> {
        Check.visit_map(map).map(|()| false)
    }
}

impl<'de> Visitor<'de> for Walk<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        Ok(())
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let fields = self.fields;
        let n = &fields.nodes[self.node];
        let mut i = 0usize;
        loop {
            let child = n
                .children
                .iter()
                .copied()
                .find(|&c| self.fields.nodes[c].index == Some(i));
            let more = match child {
                Some(c) => seq
                    .next_element_seed(Walk {
                        fields: self.fields,
                        node: c,
                        out: &mut *self.out,
                    })?
                    .is_some(),
                None => seq.next_element_seed(Check)?.is_some(),
            };
            if !more {
                return Ok(());
            }
            i += 1;
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let fields = self.fields;
        let n = &fields.nodes[self.node];
        while let Some(child) = map.next_key_seed(Key {
            fields: self.fields,
            children: &n.children,
        })? {
            match child {
                Some(c) => map.next_value_seed(Walk {
                    fields: self.fields,
                    node: c,
                    out: &mut *self.out,
                })?,
                None => map.next_value_seed(Check)?,
            }
        }
        Ok(())
    }
}

/// A map key: which child of the node it names, if any. Parsed as a string, as `Value`'s
/// keys are (same UTF-8 and escape checks).
struct Key<'f> {
    fields: &'f Fields,
    children: &'f [usize],
}

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }
    fn visit_str<E: de::Error>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self
            .children
            .iter()
            .copied()
            .find(|&c| self.fields.nodes[c].token == key))
    }
}

/// A value outside every pointer: checked as a `Value` parse checks it (strings and keys
/// parsed as strings, numbers as numbers), nothing kept. Unlike serde's `IgnoredAny`, which
/// lets serde_json skip strings without checking their UTF-8 or surrogates, and numbers
/// without their range.
struct Check;

impl<'de> DeserializeSeed<'de> for Check {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Check {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        Ok(())
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Check)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key_seed(CheckKey)?.is_some() {
            map.next_value_seed(Check)?;
        }
        Ok(())
    }
}

/// A key outside every pointer, parsed as a string.
struct CheckKey;

impl<'de> DeserializeSeed<'de> for CheckKey {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_str(Check)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the index code did before `Fields`: a full parse, then each pointer.
    fn full(paths: &[String], doc: &[u8]) -> Option<Vec<Option<Vec<u8>>>> {
        let v: Value = serde_json::from_slice(doc).ok()?;
        Some(
            paths
                .iter()
                .map(|p| v.pointer(p).and_then(crate::index::scalar_bytes))
                .collect(),
        )
    }

    fn check(paths: &[&str], doc: &[u8]) {
        let paths: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        let f = Fields::new(&paths);
        let expected = full(&paths, doc);
        assert_eq!(
            f.extract(doc),
            expected,
            "paths {paths:?}, document {:?}",
            String::from_utf8_lossy(doc)
        );
        // The entry form: every component in order, or nothing when one is missing.
        let mut want = Vec::new();
        let complete = expected.is_some_and(|vs| {
            vs.iter().all(|v| match v {
                Some(b) => {
                    crate::index::push_component(&mut want, b);
                    true
                }
                None => false,
            })
        });
        let mut got = b"prefix".to_vec();
        assert_eq!(
            f.extract_entry(doc, &mut got),
            complete,
            "paths {paths:?}, document {:?}",
            String::from_utf8_lossy(doc)
        );
        if complete {
            assert_eq!(&got[..6], b"prefix");
            assert_eq!(&got[6..], &want[..], "paths {paths:?}");
        }
    }

    #[test]
    fn walk_equals_full_parse_on_chosen_documents() {
        let docs: &[&[u8]] = &[
            br#"{"id":1,"email":"a@b","city":"x","age":30,"tags":["a","b"]}"#,
            br#"{"email":null}"#,
            br#"{"email":true,"x":false}"#,
            br#"{"email":1.50,"age":-0,"big":1e300}"#,
            br#"{"email":12345678901234567890123}"#,
            br#"{"email":-9223372036854775809}"#,
            br#"{"email":-0}"#,
            br#"{"email":1E2,"city":-1.5e-7}"#,
            br#"{"email":18446744073709551615,"city":-9223372036854775808}"#,
            br#"{"email":false,"city":null}"#,
            br#"{"email":"a","email":{"x":1}}"#,
            br#"{"email":{"x":1},"email":"b"}"#,
            br#"{"email":"a","email":"b"}"#,
            br#"{"address":{"city":"p"},"address":3}"#,
            br#"{"address":3,"address":{"city":"q"}}"#,
            br#"{"address":{"city":{"x":1}}}"#,
            br#"{"address":{"city":[1]}}"#,
            br#"{"tags":["a","b","c"]}"#,
            br#"{"a/b":"slash","m~n":"tilde"}"#,
            br#"{"em\u0061il":"escaped key","x":"\ud83d\ude00"}"#,
            br#"{"email":"ok","bad":"\ud800"}"#,
            br#"{"email":"ok","bad":1e400}"#,
            br#"{"email":"ok"} trailing"#,
            br#"{"email":"ok"}   "#,
            br#"{"email":"ok","#,
            b"{\"email\":\"ok\",\"bad\":\"\xff\"}",
            b"{\"email\":\"\xff\"}",
            br#"[{"email":"in array"}]"#,
            br#""just a string""#,
            br#"42"#,
            b"",
            b"not json",
            br#"{"email":"a\u0000b"}"#,
            br#"{"tags":{"0":"zero"}}"#,
        ];
        let path_sets: &[&[&str]] = &[
            &["/email"],
            &["/city", "/age"],
            &["/address/city"],
            &["/tags/0"],
            &["/tags/1", "/tags/01", "/tags/+1"],
            &["/a~1b", "/m~0n"],
            &["/0/email"],
            &[""],
            &["/address", "/address/city"],
            &["/email", "/email"],
        ];
        for paths in path_sets {
            for doc in docs {
                check(paths, doc);
            }
        }
    }

    #[test]
    fn deep_nesting_fails_as_the_full_parse_does() {
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        check(&["/email"], deep.as_bytes());
        let deep = format!(
            r#"{{"email":"x","n":{}1{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        check(&["/email"], deep.as_bytes());
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "[a-c]{0,3}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec(("[a-c]{1,2}", inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn walk_equals_full_parse(
            v in json_value(),
            dup in prop::option::of(("[a-c]{1,2}", json_value())),
            paths in prop::collection::vec(
                prop::collection::vec(prop_oneof!["[a-c]{1,2}", "[0-2]"], 1..3), 1..3),
            cut in any::<prop::sample::Index>(),
        ) {
            let paths: Vec<String> =
                paths.iter().map(|t| format!("/{}", t.join("/"))).collect();
            let path_refs: Vec<&str> = paths.iter().map(String::as_str).collect();
            let mut doc = serde_json::to_string(&v).unwrap();
            // A duplicate key at the top (last wins), when the document is an object.
            if let (Some((k, dv)), true) = (&dup, doc.starts_with('{') && doc.len() > 2) {
                doc.insert_str(doc.len() - 1, &format!(",{}:{}", Value::from(k.as_str()), dv));
            }
            check(&path_refs, doc.as_bytes());
            // And a truncated document, which both refuse (or both accept, if still JSON).
            let at = cut.index(doc.len() + 1);
            check(&path_refs, &doc.as_bytes()[..at]);
        }
    }
}
