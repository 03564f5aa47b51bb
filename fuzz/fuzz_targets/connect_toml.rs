//! A pipeline file (`tideline connect --config FILE`, `tideline serve --connect FILE`): any
//! text an operator (or a broken editor) leaves there, read by
//! [`tideline_connectors::config::ConnectFile::parse`]. Promises (`connectors/src/config.rs`):
//! no panic; a mistake is one `ConfigError` naming the file and a line that exists in the text,
//! with a message that says something; a file that parses has at least one pipeline, each
//! named, the names unique, `batch_changes` at least 1, and its sink table's line inside the
//! text.
//!
//! The input is the file's bytes; text that is not UTF-8 is refused before the parser, as
//! `ConnectFile::load` does (`read_to_string`). Seeds: a valid file for every sink kind, both
//! layouts (top-level and `[[pipeline]]`), and broken ones (`fuzz/corpus-seed/connect_toml/`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tideline_connectors::config::ConnectFile;

const FILE: &str = "fuzz.toml";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A line number can be one past the last newline (the text's last line), never more.
    let lines = text.bytes().filter(|&b| b == b'\n').count() + 1;
    match ConnectFile::parse(text, FILE) {
        Err(e) => {
            assert_eq!(e.file, FILE, "the error names the file");
            assert!(
                (1..=lines).contains(&e.line),
                "error line {} outside the text's 1..={lines}: {e}",
                e.line
            );
            assert!(!e.message.trim().is_empty(), "an error says what is wrong");
            assert!(e.to_string().starts_with(&format!("{FILE} line {}: ", e.line)));
        }
        Ok(file) => {
            assert!(!file.pipelines.is_empty(), "a file that parses runs something");
            for (i, p) in file.pipelines.iter().enumerate() {
                assert!(!p.name.is_empty(), "pipeline {i} has no name");
                assert!(
                    file.pipelines[..i].iter().all(|q| q.name != p.name),
                    "pipeline name {} used twice",
                    p.name
                );
                assert!(p.batch_changes >= 1);
                assert!((1..=lines).contains(&p.line), "sink line {} outside the text", p.line);
            }
        }
    }
});
