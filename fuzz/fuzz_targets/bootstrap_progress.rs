//! The bootstrap progress record a replica stores beside its copy and reads back at start-up
//! to resume ([`BootstrapProgress::from_json`]). Promises: no panic; a record that decodes
//! writes out (`to_json`) to one that decodes to the same progress.
//!
//! The first byte picks the mode: raw bytes, or a valid record built from the input and then
//! edited.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tideline_consumers::BootstrapProgress;
use tideline_fuzz::{Parts, edit};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let mut p = Parts::new(rest);
        let key: String = p.bytes(4).iter().map(|b| format!("{b:02x}")).collect();
        let mut out = BootstrapProgress {
            server_uuid: uuid::Uuid::from_bytes(p.uuid()),
            after_offset: p.u64(),
            epoch: p.flag().then(|| p.u64()),
            tree: p.text(6),
            key_hex: key,
            tree_done: p.flag(),
            trees_done: p.u64(),
            chunks: p.u64(),
            keys: p.u64(),
            bytes: p.u64(),
            keys_estimate: p.u64(),
            bytes_estimate: p.u64(),
            records: p.u64(),
            resumes: p.u64(),
        }
        .to_json();
        edit(&mut out, p.rest());
        out
    };
    if let Some(progress) = BootstrapProgress::from_json(&bytes) {
        let again =
            BootstrapProgress::from_json(&progress.to_json()).expect("a written progress decodes");
        assert_eq!(again, progress);
        let _ = progress.fraction();
        let _ = progress.bytes_estimate_now();
    }
});
