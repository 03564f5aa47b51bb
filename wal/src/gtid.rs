//! Global transaction identifiers and sets of them.
//!
//! A [`Gtid`] names one committed transaction everywhere it travels: `uuid:n`, where `uuid` is
//! the `server_uuid` of the node that first committed it and `n` counts that node's
//! transactions densely from 1. A [`GtidSet`] is a set of GTIDs in MySQL's text syntax,
//! `uuid:1-5:7-9,uuid2:1-3`, always held in canonical form: uuids sorted, intervals sorted,
//! disjoint and non-adjacent. Equal sets therefore format to equal strings.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// The id of one committed transaction: the origin node's `server_uuid` and a sequence number
/// dense from 1 per origin.
///
/// persisted: changes must stay backward compatible (it is part of every log record).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct Gtid {
    /// The `server_uuid` of the node that first committed the transaction.
    pub uuid: Uuid,
    /// The transaction's number among that node's transactions, dense from 1.
    pub seq: u64,
}

impl Gtid {
    /// Makes a GTID. `seq` must be at least 1.
    pub fn new(uuid: Uuid, seq: u64) -> Result<Self, GtidParseError> {
        if seq == 0 {
            return Err(GtidParseError::new("0", "GTID numbers start at 1"));
        }
        Ok(Gtid { uuid, seq })
    }
}

impl fmt::Display for Gtid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.uuid.hyphenated(), self.seq)
    }
}

impl FromStr for Gtid {
    type Err = GtidParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (uuid, seq) = s
            .trim()
            .rsplit_once(':')
            .ok_or_else(|| GtidParseError::new(s, "expected `uuid:n`"))?;
        let uuid = parse_uuid(uuid)?;
        let seq = parse_seq(seq)?;
        Gtid::new(uuid, seq)
    }
}

/// Why a GTID or GTID set text did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid GTID text near `{near}`: {reason} (write sets as `uuid:1-5:7,uuid2:1-3`)")]
pub struct GtidParseError {
    near: String,
    reason: &'static str,
}

impl GtidParseError {
    fn new(near: &str, reason: &'static str) -> Self {
        let near: String = near.chars().take(60).collect();
        GtidParseError { near, reason }
    }
}

fn parse_uuid(s: &str) -> Result<Uuid, GtidParseError> {
    let s = s.trim();
    Uuid::try_parse(s).map_err(|_| GtidParseError::new(s, "not a uuid"))
}

fn parse_seq(s: &str) -> Result<u64, GtidParseError> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(GtidParseError::new(s, "expected a transaction number"));
    }
    let n: u64 = s
        .parse()
        .map_err(|_| GtidParseError::new(s, "transaction number too large"))?;
    if n == 0 {
        return Err(GtidParseError::new(s, "GTID numbers start at 1"));
    }
    Ok(n)
}

/// An inclusive interval `start..=end` of transaction numbers, `1 <= start <= end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Interval {
    /// First number in the interval.
    pub start: u64,
    /// Last number in the interval (inclusive).
    pub end: u64,
}

impl Interval {
    fn len(&self) -> u64 {
        self.end - self.start + 1
    }
}

/// A set of GTIDs in canonical form.
///
/// Text form is MySQL's: `uuid:1-5:7-9,uuid2:1-3`; the empty set formats as the empty string.
///
/// ```
/// use tideline_wal::GtidSet;
/// let a: GtidSet = "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5:7".parse()?;
/// let b: GtidSet = "3e11fa47-71ca-11e1-9e33-c80aa9429562:6".parse()?;
/// assert_eq!(a.union(&b).to_string(), "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-7");
/// # Ok::<(), tideline_wal::GtidParseError>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct GtidSet {
    /// Invariant: every vector is non-empty, sorted, disjoint and non-adjacent.
    by_uuid: BTreeMap<Uuid, Vec<Interval>>,
}

impl GtidSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the set holds no GTID.
    pub fn is_empty(&self) -> bool {
        self.by_uuid.is_empty()
    }

    /// Number of GTIDs in the set (saturating).
    pub fn count(&self) -> u64 {
        self.by_uuid
            .values()
            .flatten()
            .fold(0u64, |acc, iv| acc.saturating_add(iv.len()))
    }

    /// Whether `gtid` is in the set.
    pub fn contains(&self, gtid: &Gtid) -> bool {
        let Some(ivs) = self.by_uuid.get(&gtid.uuid) else {
            return false;
        };
        let idx = ivs.partition_point(|iv| iv.end < gtid.seq);
        ivs.get(idx).is_some_and(|iv| iv.start <= gtid.seq)
    }

    /// Adds one GTID. Returns whether it was new.
    pub fn insert(&mut self, gtid: Gtid) -> bool {
        if self.contains(&gtid) {
            return false;
        }
        self.insert_interval(
            gtid.uuid,
            Interval {
                start: gtid.seq,
                end: gtid.seq,
            },
        );
        true
    }

    /// Adds `start..=end` for `uuid`. Ignores an empty or invalid interval (`start == 0` or
    /// `start > end`).
    pub fn insert_interval(&mut self, uuid: Uuid, iv: Interval) {
        if iv.start == 0 || iv.start > iv.end {
            return;
        }
        let ivs = self.by_uuid.entry(uuid).or_default();
        // Fast path: appending the next number, which is what a log does all day.
        if let Some(last) = ivs.last_mut() {
            if iv.start > last.end && iv.start - last.end == 1 {
                last.end = iv.end;
                return;
            }
            if iv.start > last.end {
                ivs.push(iv);
                return;
            }
        }
        // Anywhere else: the intervals it overlaps or touches, found by binary search, become
        // one (no sort of the whole list).
        let from = ivs.partition_point(|x| x.end.saturating_add(1) < iv.start);
        let to = ivs.partition_point(|x| x.start <= iv.end.saturating_add(1));
        if from == to {
            ivs.insert(from, iv);
            return;
        }
        let merged = Interval {
            start: iv.start.min(ivs[from].start),
            end: iv.end.max(ivs[to - 1].end),
        };
        ivs[from] = merged;
        ivs.drain(from + 1..to);
    }

    /// The uuids present, sorted.
    pub fn uuids(&self) -> impl Iterator<Item = &Uuid> {
        self.by_uuid.keys()
    }

    /// The intervals of `uuid`, sorted and disjoint.
    pub fn intervals(&self, uuid: &Uuid) -> &[Interval] {
        self.by_uuid.get(uuid).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The highest number held for `uuid`, if any.
    pub fn last_seq(&self, uuid: &Uuid) -> Option<u64> {
        self.by_uuid
            .get(uuid)
            .and_then(|ivs| ivs.last())
            .map(|iv| iv.end)
    }

    /// `self ∪ other`.
    pub fn union(&self, other: &GtidSet) -> GtidSet {
        let mut out = self.clone();
        out.union_with(other);
        out
    }

    /// `self ← self ∪ other`.
    pub fn union_with(&mut self, other: &GtidSet) {
        for (uuid, ivs) in &other.by_uuid {
            let mine = self.by_uuid.entry(*uuid).or_default();
            *mine = merge(mine, ivs);
        }
    }

    /// `self \ other`: the GTIDs of `self` that are not in `other`.
    pub fn difference(&self, other: &GtidSet) -> GtidSet {
        let mut by_uuid = BTreeMap::new();
        for (uuid, ivs) in &self.by_uuid {
            let rest = match other.by_uuid.get(uuid) {
                None => ivs.clone(),
                Some(theirs) => subtract(ivs, theirs),
            };
            if !rest.is_empty() {
                by_uuid.insert(*uuid, rest);
            }
        }
        GtidSet { by_uuid }
    }

    /// `self ∩ other`.
    pub fn intersection(&self, other: &GtidSet) -> GtidSet {
        self.difference(&self.difference(other))
    }

    /// Whether the two sets share at least one GTID.
    pub fn intersects(&self, other: &GtidSet) -> bool {
        self.by_uuid.iter().any(|(uuid, ivs)| {
            other.by_uuid.get(uuid).is_some_and(|theirs| {
                let (mut i, mut j) = (0, 0);
                while i < ivs.len() && j < theirs.len() {
                    let (a, b) = (ivs[i], theirs[j]);
                    if a.end < b.start {
                        i += 1;
                    } else if b.end < a.start {
                        j += 1;
                    } else {
                        return true;
                    }
                }
                false
            })
        })
    }

    /// Whether every GTID of `self` is in `other`.
    pub fn is_subset(&self, other: &GtidSet) -> bool {
        self.difference(other).is_empty()
    }
}

/// Sorts and merges overlapping or adjacent intervals in place: n log n, for intervals in any
/// order.
fn normalize(ivs: &mut Vec<Interval>) {
    ivs.sort_unstable();
    let mut out: Vec<Interval> = Vec::with_capacity(ivs.len());
    for iv in ivs.drain(..) {
        push_merged(&mut out, iv);
    }
    *ivs = out;
}

/// Appends `iv`, which starts at or after the last interval of `out`, merging it with that
/// one if they overlap or touch.
fn push_merged(out: &mut Vec<Interval>, iv: Interval) {
    match out.last_mut() {
        Some(last) if iv.start <= last.end.saturating_add(1) => {
            last.end = last.end.max(iv.end);
        }
        _ => out.push(iv),
    }
}

/// `a ∪ b` for canonical interval lists, in one pass over both.
fn merge(a: &[Interval], b: &[Interval]) -> Vec<Interval> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let next = match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if y.start < x.start => {
                j += 1;
                *y
            }
            (Some(x), _) => {
                i += 1;
                *x
            }
            (None, Some(y)) => {
                j += 1;
                *y
            }
            (None, None) => break,
        };
        push_merged(&mut out, next);
    }
    out
}

/// `a \ b` for canonical interval lists: |a| log |b| plus what `b` cuts out of `a`.
fn subtract(a: &[Interval], b: &[Interval]) -> Vec<Interval> {
    let mut out = Vec::new();
    let mut j = 0;
    for &iv in a {
        let mut cur = iv;
        let mut alive = true;
        // Binary search, not a walk: `b` may be a client's set of millions of intervals and
        // `a` a segment's few (a reader's start checks one against each segment).
        j += b[j..].partition_point(|x| x.end < cur.start);
        let mut k = j;
        while alive && k < b.len() && b[k].start <= cur.end {
            let cut = b[k];
            if cut.start > cur.start {
                out.push(Interval {
                    start: cur.start,
                    end: cut.start - 1,
                });
            }
            if cut.end >= cur.end {
                alive = false;
            } else {
                cur.start = cut.end + 1;
                k += 1;
            }
        }
        if alive {
            out.push(cur);
        }
    }
    out
}

impl From<Gtid> for GtidSet {
    fn from(g: Gtid) -> Self {
        let mut s = GtidSet::new();
        s.insert(g);
        s
    }
}

impl FromIterator<Gtid> for GtidSet {
    /// GTIDs in any order; sorted and merged once per uuid.
    fn from_iter<I: IntoIterator<Item = Gtid>>(iter: I) -> Self {
        let mut by_uuid: BTreeMap<Uuid, Vec<Interval>> = BTreeMap::new();
        for g in iter {
            if g.seq == 0 {
                continue;
            }
            let iv = Interval {
                start: g.seq,
                end: g.seq,
            };
            by_uuid.entry(g.uuid).or_default().push(iv);
        }
        GtidSet::from_unsorted(by_uuid)
    }
}

impl GtidSet {
    /// The set of valid intervals (`1 <= start <= end`) listed per uuid in any order, with
    /// overlaps and repeats: each list is sorted and merged once.
    fn from_unsorted(mut by_uuid: BTreeMap<Uuid, Vec<Interval>>) -> GtidSet {
        by_uuid.retain(|_, ivs| {
            normalize(ivs);
            !ivs.is_empty()
        });
        GtidSet { by_uuid }
    }
}

impl fmt::Display for GtidSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (uuid, ivs)) in self.by_uuid.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}", uuid.hyphenated())?;
            for iv in ivs {
                if iv.start == iv.end {
                    write!(f, ":{}", iv.start)?;
                } else {
                    write!(f, ":{}-{}", iv.start, iv.end)?;
                }
            }
        }
        Ok(())
    }
}

impl FromStr for GtidSet {
    type Err = GtidParseError;

    /// Parses MySQL's syntax. Accepts whitespace and newlines around items (as MySQL prints
    /// them), repeated uuids and unsorted or overlapping intervals; the result is canonical.
    /// Takes n log n in the number of intervals, whatever their order: they are collected per
    /// uuid and sorted once.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut by_uuid: BTreeMap<Uuid, Vec<Interval>> = BTreeMap::new();
        if s.trim().is_empty() {
            return Ok(GtidSet::new());
        }
        for item in s.split(',') {
            let item = item.trim();
            if item.is_empty() {
                return Err(GtidParseError::new(s, "empty item between commas"));
            }
            let mut parts = item.split(':');
            let uuid = parse_uuid(parts.next().unwrap_or_default())?;
            let ivs = by_uuid.entry(uuid).or_default();
            let mut any = false;
            for range in parts {
                any = true;
                let (start, end) = match range.split_once('-') {
                    Some((a, b)) => (parse_seq(a)?, parse_seq(b)?),
                    None => {
                        let n = parse_seq(range)?;
                        (n, n)
                    }
                };
                if start > end {
                    return Err(GtidParseError::new(
                        range,
                        "interval start is after its end",
                    ));
                }
                ivs.push(Interval { start, end });
            }
            if !any {
                return Err(GtidParseError::new(item, "uuid without any interval"));
            }
        }
        Ok(GtidSet::from_unsorted(by_uuid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn uuid_n(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    #[test]
    fn parses_and_formats_canonical() {
        let u1 = "3e11fa47-71ca-11e1-9e33-c80aa9429562";
        let u2 = "00000000-0000-0000-0000-000000000001";
        let s: GtidSet = format!("{u1}:7-9:1-5:6, {u2}:3:1-2").parse().unwrap();
        assert_eq!(s.to_string(), format!("{u2}:1-3,{u1}:1-9"));
        assert_eq!("".parse::<GtidSet>().unwrap(), GtidSet::new());
    }

    #[test]
    fn rejects_bad_text_with_a_hint() {
        for bad in [
            "nope",
            "3e11fa47-71ca-11e1-9e33-c80aa9429562",
            "3e11fa47-71ca-11e1-9e33-c80aa9429562:0",
            "3e11fa47-71ca-11e1-9e33-c80aa9429562:5-2",
            "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-x",
            "3e11fa47-71ca-11e1-9e33-c80aa9429562:1,,",
            "3e11fa47-71ca-11e1-9e33-c80aa9429562:99999999999999999999999",
        ] {
            let err = bad.parse::<GtidSet>().unwrap_err();
            assert!(err.to_string().contains("uuid:1-5"), "{err}");
        }
        assert!("x:1".parse::<Gtid>().is_err());
        assert!(
            "3e11fa47-71ca-11e1-9e33-c80aa9429562:0"
                .parse::<Gtid>()
                .is_err()
        );
    }

    /// A set text is client input (a subscription's start, a `WaitFor`, an index fence, an
    /// HTTP query) parsed on the async runtime: ranges in any order must parse in n log n, or
    /// one client with a few hundred KiB of descending ranges stalls the node for seconds.
    #[test]
    fn a_set_of_many_ranges_parses_fast_in_any_order() {
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        const N: u64 = 50_000;
        let u = "3e11fa47-71ca-11e1-9e33-c80aa9429562";
        // Every other number, so no two ranges merge and the set keeps N intervals.
        let mut numbers: Vec<u64> = (1..=N).map(|i| 2 * i).collect();
        let text = |ns: &[u64]| {
            let ranges: Vec<String> = ns.iter().map(u64::to_string).collect();
            format!("{u}:{}", ranges.join(":"))
        };
        let ascending: GtidSet = text(&numbers).parse().unwrap();
        assert_eq!(
            ascending
                .intervals(&ascending.uuids().next().copied().unwrap())
                .len(),
            N as usize
        );
        numbers.reverse();
        let descending = text(&numbers);
        numbers.shuffle(&mut rand::rngs::StdRng::seed_from_u64(7));
        let shuffled = text(&numbers);
        let kib = descending.len() >> 10;
        let mut took = Vec::new();
        for (order, text) in [("descending", descending), ("shuffled", shuffled)] {
            let began = std::time::Instant::now();
            let set: GtidSet = text.parse().unwrap();
            took.push((order, began.elapsed()));
            assert_eq!(set, ascending, "{order} ranges parsed to another set");
        }
        assert!(
            took.iter()
                .all(|(_, t)| *t < std::time::Duration::from_secs(2)),
            "{N} ranges ({kib} KiB of text) took {took:?} to parse; a client's set must not \
             hold up the runtime for seconds"
        );
    }

    fn arb_set() -> impl Strategy<Value = BTreeSet<(u8, u64)>> {
        proptest::collection::btree_set((0u8..3, 1u64..40), 0..40)
    }

    fn to_set(model: &BTreeSet<(u8, u64)>) -> GtidSet {
        model
            .iter()
            .map(|&(u, n)| Gtid {
                uuid: uuid_n(u),
                seq: n,
            })
            .collect()
    }

    fn to_model(set: &GtidSet) -> BTreeSet<(u8, u64)> {
        let mut out = BTreeSet::new();
        for uuid in set.uuids() {
            for iv in set.intervals(uuid) {
                for n in iv.start..=iv.end {
                    out.insert((uuid.as_bytes()[0], n));
                }
            }
        }
        out
    }

    fn is_canonical(set: &GtidSet) -> bool {
        set.by_uuid.values().all(|ivs| {
            !ivs.is_empty()
                && ivs.iter().all(|iv| iv.start >= 1 && iv.start <= iv.end)
                && ivs.windows(2).all(|w| w[0].end + 1 < w[1].start)
        })
    }

    proptest! {
        #[test]
        fn format_parse_round_trip(m in arb_set()) {
            let s = to_set(&m);
            prop_assert!(is_canonical(&s));
            let text = s.to_string();
            let back: GtidSet = text.parse().unwrap();
            prop_assert_eq!(&back, &s);
            prop_assert_eq!(back.to_string(), text);
        }

        /// Intervals inserted one by one in any order (overlapping, touching, repeated) make
        /// the canonical set of their numbers, as the text of them parses to.
        #[test]
        fn inserting_intervals_in_any_order_matches_naive_model(
            ivs in proptest::collection::vec((0u8..2, 1u64..60, 0u64..6), 0..30)
        ) {
            let mut set = GtidSet::new();
            let mut model = BTreeSet::new();
            for &(u, start, len) in &ivs {
                set.insert_interval(uuid_n(u), Interval { start, end: start + len });
                model.extend((start..=start + len).map(|n| (u, n)));
                prop_assert!(is_canonical(&set));
            }
            prop_assert_eq!(to_model(&set), model.clone());
            prop_assert_eq!(&set, &to_set(&model));
        }

        #[test]
        fn algebra_matches_naive_model(a in arb_set(), b in arb_set(), probe in (0u8..3, 1u64..45)) {
            let (sa, sb) = (to_set(&a), to_set(&b));
            let u = sa.union(&sb);
            let d = sa.difference(&sb);
            let i = sa.intersection(&sb);
            prop_assert!(is_canonical(&u) && is_canonical(&d) && is_canonical(&i));
            prop_assert_eq!(to_model(&u), a.union(&b).copied().collect::<BTreeSet<_>>());
            prop_assert_eq!(to_model(&d), a.difference(&b).copied().collect::<BTreeSet<_>>());
            prop_assert_eq!(to_model(&i), a.intersection(&b).copied().collect::<BTreeSet<_>>());
            prop_assert_eq!(sa.intersects(&sb), !a.is_disjoint(&b));
            prop_assert_eq!(sa.is_subset(&sb), a.is_subset(&b));
            prop_assert_eq!(sa.count(), a.len() as u64);
            let g = Gtid { uuid: uuid_n(probe.0), seq: probe.1 };
            prop_assert_eq!(sa.contains(&g), a.contains(&probe));
            // Laws: A ∪ B = B ∪ A; (A \ B) ∪ (A ∩ B) = A; (A \ B) ∩ B = ∅.
            prop_assert_eq!(&u, &sb.union(&sa));
            prop_assert_eq!(&d.union(&i), &sa);
            prop_assert!(!d.intersects(&sb));
        }
    }
}
