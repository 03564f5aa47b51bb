//! A consumer's checkpoint file (`FileCheckpoint`): whatever is on disk at start-up, read by
//! [`Position::parse`]. Promises: no panic; bytes that parse are a position that writes out
//! (`Position::to_bytes`, what a save stores) and parses back to the same position.
//!
//! The first byte picks the mode: raw bytes, or a valid checkpoint file built from the input
//! and then edited.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tideline_consumers::Position;
use tideline_fuzz::{Parts, edit};
use tideline_wal::{Epoch, GtidSet};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let mut p = Parts::new(rest);
        let server_uuid = uuid::Uuid::from_bytes(p.uuid());
        let offset = p.u64();
        let gtids = format!("{server_uuid}:1-{}", 1 + p.u64() % 1000)
            .parse::<GtidSet>()
            .expect("a GTID set built in memory parses");
        let epoch = p.flag().then(|| Epoch::new(p.u64()));
        let mut out = Position {
            server_uuid,
            offset,
            gtids,
            epoch,
        }
        .to_bytes();
        edit(&mut out, p.rest());
        out
    };
    if let Ok(pos) = Position::parse(&bytes) {
        let again = Position::parse(&pos.to_bytes()).expect("a written checkpoint parses");
        assert_eq!(again, pos);
    }
});
