//! GTID-set text, as it arrives in requests (`gtid:SET` starts, read fences), responses,
//! checkpoint files, the CLI and segment headers. Promises: no panic (including overflow at
//! `u64::MAX`); a parsed set formats to canonical text that parses to the same set and
//! formats the same again; single GTIDs round-trip too; the set operations agree with each
//! other on any two parsed sets.
//!
//! The first byte picks the mode: raw text, or text assembled from GTID-set tokens (uuids,
//! numbers near the limits, separators), which reaches the interval merging far sooner.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tideline_wal::{Gtid, GtidSet};

const TOKENS: &[&str] = &[
    "3e11fa47-71ca-11e1-9e33-c80aa9429562",
    "00000000-0000-0000-0000-000000000001",
    "{00000000-0000-0000-0000-000000000001}",
    "ffffffffffffffffffffffffffffffff",
    ":",
    ":",
    "-",
    ",",
    " ",
    "\n",
    "1",
    "2",
    "3",
    "5",
    "9",
    "0",
    "18446744073709551615",
    "18446744073709551614",
    "18446744073709551616",
    "9223372036854775808",
];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        rest.iter()
            .map(|b| TOKENS[usize::from(*b) % TOKENS.len()])
            .collect()
    };
    if let Ok(g) = text.parse::<Gtid>() {
        let back: Gtid = g.to_string().parse().expect("a formatted GTID parses");
        assert_eq!(back, g);
    }
    // Two more sets: the text split at the character the mode names.
    let cut = text
        .char_indices()
        .map(|(i, _)| i)
        .nth(usize::from(mode >> 1))
        .unwrap_or(text.len());
    let (a, b) = text.split_at(cut);
    let sets: Vec<GtidSet> = [&text[..], a, b]
        .iter()
        .filter_map(|t| t.parse::<GtidSet>().ok())
        .collect();
    for s in &sets {
        let canonical = s.to_string();
        let back: GtidSet = canonical.parse().expect("a formatted GTID set parses");
        assert_eq!(&back, s);
        assert_eq!(back.to_string(), canonical);
        let _ = s.count();
        for u in s.uuids() {
            let last = s.last_seq(u).expect("a uuid present has a last number");
            let g = Gtid::new(*u, last).expect("a last number is at least 1");
            assert!(s.contains(&g));
        }
    }
    if let [x, y, ..] = &sets[..] {
        let union = x.union(y);
        assert!(x.is_subset(&union) && y.is_subset(&union));
        let diff = x.difference(y);
        assert!(diff.is_subset(x));
        assert!(!diff.intersects(y));
        let inter = x.intersection(y);
        assert!(inter.is_subset(x) && inter.is_subset(y));
        assert_eq!(diff.union(&inter), *x);
    }
});
