//! Start positions as users write them: `earliest`, `latest`, `offset:N`, `gtid:SET`.

use std::fmt;
use std::str::FromStr;

use tideline_wal::{GtidSet, Offset};

/// Where a tail or dump starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartPosition {
    /// The oldest record still in the log.
    Earliest,
    /// The first record committed after the request.
    Latest,
    /// A local offset.
    Offset(Offset),
    /// Every record whose GTID is not in the set (auto-positioning).
    Gtid(GtidSet),
}

impl FromStr for StartPosition {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const HINT: &str = "use earliest, latest, offset:N or gtid:SET (e.g. gtid:3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5)";
        let s = s.trim();
        match s {
            "earliest" => return Ok(StartPosition::Earliest),
            "latest" => return Ok(StartPosition::Latest),
            _ => {}
        }
        if let Some(n) = s.strip_prefix("offset:") {
            return n
                .parse::<Offset>()
                .map(StartPosition::Offset)
                .map_err(|e| format!("bad position `{s}`: {e}"));
        }
        if let Some(set) = s.strip_prefix("gtid:") {
            return set
                .parse::<GtidSet>()
                .map(StartPosition::Gtid)
                .map_err(|e| format!("bad position `{s}`: {e}"));
        }
        Err(format!("bad position `{s}`: {HINT}"))
    }
}

impl fmt::Display for StartPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartPosition::Earliest => f.write_str("earliest"),
            StartPosition::Latest => f.write_str("latest"),
            StartPosition::Offset(o) => write!(f, "offset:{o}"),
            StartPosition::Gtid(s) => write!(f, "gtid:{s}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_rejects_garbage() {
        assert_eq!(
            "earliest".parse::<StartPosition>().unwrap(),
            StartPosition::Earliest
        );
        assert_eq!(
            "latest".parse::<StartPosition>().unwrap(),
            StartPosition::Latest
        );
        assert_eq!(
            "offset:501".parse::<StartPosition>().unwrap(),
            StartPosition::Offset(Offset::new(501).unwrap())
        );
        let g = "gtid:3e11fa47-71ca-11e1-9e33-c80aa9429562:1-600";
        assert_eq!(g.parse::<StartPosition>().unwrap().to_string(), g);
        for bad in ["garbage", "offset:0", "offset:x", "gtid:nope:1", ""] {
            let e = bad.parse::<StartPosition>().unwrap_err();
            assert!(e.contains("bad position"), "{e}");
        }
    }
}
