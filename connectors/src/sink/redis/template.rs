//! The Redis sink's key template: a row's Redis key, and the `SCAN MATCH` pattern of a tree's
//! keys.
//!
//! Owns: rendering and parsing `key` (`{tree}`, `{key}`, literal text). Must never: talk to
//! Redis.

use crate::sink::SinkError;

/// A piece of the key template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(Vec<u8>),
    Tree,
    Key,
}

/// The parsed `key` setting.
#[derive(Debug, Clone)]
pub(super) struct Template(Vec<Part>);

impl Template {
    /// Parses the sink's `key` setting: `{tree}` and `{key}` in literal text, `{key}` once.
    pub(super) fn parse(t: &str) -> Result<Template, SinkError> {
        let mut parts = Vec::new();
        let mut lit = Vec::new();
        let mut rest = t;
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix("{tree}") {
                parts.push(Part::Lit(std::mem::take(&mut lit)));
                parts.push(Part::Tree);
                rest = r;
            } else if let Some(r) = rest.strip_prefix("{key}") {
                parts.push(Part::Lit(std::mem::take(&mut lit)));
                parts.push(Part::Key);
                rest = r;
            } else {
                let c = rest.chars().next().expect("rest is not empty");
                let mut buf = [0u8; 4];
                lit.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                rest = &rest[c.len_utf8()..];
            }
        }
        parts.push(Part::Lit(lit));
        parts.retain(|p| !matches!(p, Part::Lit(l) if l.is_empty()));
        if parts.iter().filter(|p| **p == Part::Key).count() != 1 {
            return Err(SinkError::Fatal(format!(
                "sink key `{t}` must contain `{{key}}` exactly once (e.g. \"{{tree}}:{{key}}\")"
            )));
        }
        Ok(Template(parts))
    }

    pub(super) fn key(&self, tree: &str, key: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(tree.len() + key.len() + 8);
        for p in &self.0 {
            match p {
                Part::Lit(b) => out.extend_from_slice(b),
                Part::Tree => out.extend_from_slice(tree.as_bytes()),
                Part::Key => out.extend_from_slice(key),
            }
        }
        out
    }

    /// The `SCAN MATCH` pattern of every key of `tree`.
    pub(super) fn pattern(&self, tree: &str) -> Vec<u8> {
        self.pattern_with(tree, b"")
    }

    /// The `SCAN MATCH` pattern of the keys of `tree` whose row key starts with `prefix`.
    pub(super) fn pattern_with(&self, tree: &str, prefix: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in &self.0 {
            match p {
                Part::Lit(b) => glob_escape(b, &mut out),
                Part::Tree => glob_escape(tree.as_bytes(), &mut out),
                Part::Key => {
                    glob_escape(prefix, &mut out);
                    out.push(b'*');
                }
            }
        }
        out
    }

    /// Whether the template begins with `{key}`: its pattern is then anchored nowhere (`*...`),
    /// and cannot tell the pipeline's keys from other data.
    pub(super) fn begins_with_key(&self) -> bool {
        self.0.first() == Some(&Part::Key)
    }
}

fn glob_escape(bytes: &[u8], out: &mut Vec<u8>) {
    for &b in bytes {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
            out.push(b'\\');
        }
        out.push(b);
    }
}
