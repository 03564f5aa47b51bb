//! Key-value pairs packed in one buffer: the form a bootstrap chunk travels in, from the
//! serving node's store through the wire and the replica's pipeline into its engine, without
//! a buffer per key or value on the way.
//!
//! Format, per entry: `u32` key length, `u32` value length (both little endian), the key, the
//! value. [`PackedEntries`] holds such a body whose entries are checked once, when it is built
//! from bytes that came from a peer ([`PackedEntries::from_body`]): every length lies inside
//! the body and the keys are strictly ascending. Iterating it then needs no checks and lends
//! each key and value as a slice of the body.

use std::fmt;

/// Bytes of an entry's header (`u32` key length, `u32` value length).
pub const ENTRY_HEADER_BYTES: usize = 8;

/// Appends one entry to a packed body. Keys and values are far below 4 GiB (the engine's
/// limits); a longer one panics rather than write a length that wraps.
pub fn pack_entry(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let len = |b: &[u8]| u32::try_from(b.len()).expect("a key or value under 4 GiB");
    out.extend_from_slice(&len(key).to_le_bytes());
    out.extend_from_slice(&len(value).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
}

/// Entries packed in one buffer, keys strictly ascending (see the module docs).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PackedEntries {
    body: Vec<u8>,
    count: usize,
    /// Where the last entry starts (0 when there is none).
    last: usize,
}

/// Why a packed body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("packed entries: {0}")]
pub struct PackedError(String);

/// The entry starting at byte `at` of a packed body: its key, its value and where the next
/// begins; `None` when the header or a length runs past the body. The one reader of the
/// format: for a body not (yet) checked, such as one being split into parts.
pub fn entry_at(body: &[u8], at: usize) -> Option<(&[u8], &[u8], usize)> {
    let header = body.get(at..at.checked_add(ENTRY_HEADER_BYTES)?)?;
    let klen = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let vlen = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    let start = at + ENTRY_HEADER_BYTES;
    let kend = start.checked_add(klen)?;
    let vend = kend.checked_add(vlen)?;
    Some((body.get(start..kend)?, body.get(kend..vend)?, vend))
}

impl PackedEntries {
    /// No entries.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks a body (peer data): every entry whole, keys strictly ascending. Range bounds
    /// are the caller's to check (`iter` is cheap).
    pub fn from_body(body: Vec<u8>) -> Result<Self, PackedError> {
        let mut count = 0usize;
        let mut at = 0usize;
        let mut last = 0usize;
        let mut prev: Option<&[u8]> = None;
        while at < body.len() {
            let (key, _, next) = entry_at(&body, at)
                .ok_or_else(|| PackedError(format!("the entry at byte {at} runs past the body")))?;
            if prev.is_some_and(|p| p >= key) {
                return Err(PackedError(format!(
                    "entry {count} (at byte {at}) is not above the entry before it (keys must \
                     be strictly ascending)"
                )));
            }
            prev = Some(key);
            count += 1;
            last = at;
            at = next;
        }
        Ok(Self { body, count, last })
    }

    /// Packs pairs given in strictly ascending key order; `None` if they are not.
    pub fn from_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Option<Self> {
        let mut out = Self::new();
        for (k, v) in pairs {
            if !out.push(k.as_ref(), v.as_ref()) {
                return None;
            }
        }
        Some(out)
    }

    /// Appends an entry whose key is above every key held; `false` (and nothing appended)
    /// otherwise.
    pub fn push(&mut self, key: &[u8], value: &[u8]) -> bool {
        if self.last_key().is_some_and(|last| last >= key) {
            return false;
        }
        self.last = self.body.len();
        pack_entry(&mut self.body, key, value);
        self.count += 1;
        true
    }

    /// The entries in key order, lent from the body.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            body: &self.body,
            at: 0,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The packed body (the wire form).
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// Bytes of keys and values, headers excluded.
    pub fn data_bytes(&self) -> usize {
        self.body.len() - ENTRY_HEADER_BYTES * self.count
    }

    /// The largest key, if any.
    pub fn last_key(&self) -> Option<&[u8]> {
        entry_at(&self.body, self.last).map(|(k, _, _)| k)
    }

    /// A key outside `[from, to)` (`to: None`: no end), if any. The keys ascend, so the first
    /// and the last bound the rest.
    pub fn key_outside(&self, from: &[u8], to: Option<&[u8]>) -> Option<&[u8]> {
        let first = self.iter().next().map(|(k, _)| k);
        first
            .filter(|k| *k < from)
            .or_else(|| self.last_key().filter(|k| to.is_some_and(|to| *k >= to)))
    }

    /// Keeps the entries whose key passes `keep` (a copy of the kept ones).
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8]) -> bool) {
        let mut kept = Self::new();
        for (k, v) in self.iter().filter(|(k, _)| keep(k)) {
            kept.push(k, v);
        }
        *self = kept;
    }
}

impl fmt::Debug for PackedEntries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The pairs, not the bytes; a long list is cut.
        let mut list = f.debug_list();
        for (k, v) in self.iter().take(8) {
            list.entry(&(String::from_utf8_lossy(k), String::from_utf8_lossy(v)));
        }
        if self.count > 8 {
            list.entry(&format_args!("... {} entries in all", self.count));
        }
        list.finish()
    }
}

/// The entries of a [`PackedEntries`], lent in key order.
#[derive(Clone)]
pub struct Iter<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        // The body was checked when built; a short one (impossible) just ends the iteration.
        let (key, value, next) = entry_at(self.body, self.at)?;
        self.at = next;
        Some((key, value))
    }
}

impl<'a> IntoIterator for &'a PackedEntries {
    type Item = (&'a [u8], &'a [u8]);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_pairs_come_back_in_order_and_bad_bodies_are_refused() {
        let p = PackedEntries::from_pairs([(&b"a"[..], &b"1"[..]), (b"bb", b""), (b"c", b"333")])
            .unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p.data_bytes(), 1 + 1 + 2 + 1 + 3);
        let got: Vec<_> = p.iter().collect();
        assert_eq!(
            got,
            vec![(&b"a"[..], &b"1"[..]), (b"bb", b""), (b"c", b"333")]
        );
        assert_eq!(p.last_key(), Some(&b"c"[..]));
        assert_eq!(
            p.key_outside(b"a", Some(b"d")),
            None,
            "bounds inclusive, exclusive"
        );
        assert_eq!(p.key_outside(b"b", None), Some(&b"a"[..]));
        assert_eq!(p.key_outside(b"", Some(b"c")), Some(&b"c"[..]));
        assert_eq!(PackedEntries::from_body(p.body().to_vec()).unwrap(), p);

        // Cut anywhere inside the last entry: refused, never a panic.
        for cut in p.body().len() - 11..p.body().len() {
            assert!(PackedEntries::from_body(p.body()[..cut].to_vec()).is_err());
        }
        // Not ascending, or a repeated key.
        let mut body = Vec::new();
        pack_entry(&mut body, b"b", b"");
        pack_entry(&mut body, b"a", b"");
        let err = PackedEntries::from_body(body).unwrap_err();
        assert!(err.to_string().contains("ascending"), "{err}");
        assert!(PackedEntries::from_pairs([(&b"a"[..], &b""[..]), (b"a", b"")]).is_none());
        // A length that would overflow the body's index.
        let mut huge = vec![0xff; 8];
        huge.extend_from_slice(b"k");
        assert!(PackedEntries::from_body(huge).is_err());
        assert!(PackedEntries::from_body(Vec::new()).unwrap().is_empty());
    }

    #[test]
    fn retain_keeps_the_passing_keys_packed() {
        assert!(
            PackedEntries::from_pairs([(&b"a1"[..], &b"x"[..]), (b"b1", b"y"), (b"a2", b"z")])
                .is_none(),
            "a2 after b1 is out of order"
        );
        let mut p =
            PackedEntries::from_pairs([(&b"a1"[..], &b"x"[..]), (b"a2", b"z"), (b"b1", b"y")])
                .unwrap();
        p.retain(|k| k.starts_with(b"a"));
        assert_eq!(
            p.iter().collect::<Vec<_>>(),
            vec![(&b"a1"[..], &b"x"[..]), (b"a2", b"z")]
        );
        assert_eq!(p.last_key(), Some(&b"a2"[..]));
        assert!(!p.push(b"a2", b"again"));
        assert!(p.push(b"a3", b"w"));
        assert_eq!(p.len(), 3);
        assert_eq!(p.last_key(), Some(&b"a3"[..]));
        p.retain(|_| false);
        assert_eq!((p.len(), p.last_key()), (0, None));
    }
}
