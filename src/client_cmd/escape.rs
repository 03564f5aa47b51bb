//! The escaping of `scan` output and `load` input: `\\` `\t` `\n` `\r` inside a key or value,
//! so every row is one `KEY<TAB>VALUE` line and `scan | load` copies any bytes.
//!
//! Owns: both directions of the escape. Must never: change without both commands (and the
//! help text of `scan` and `load`, README) changing with it: users keep files in this form.

use std::io::Write;

/// Writes `bytes` with `\` `\t` `\n` `\r` escaped, as `load` reads them back.
pub fn write_escaped(out: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.write_all(&bytes[start..i])?;
        out.write_all(esc)?;
        start = i + 1;
    }
    out.write_all(&bytes[start..])
}

/// Undoes [`write_escaped`]; an unknown escape is an error naming it.
pub fn unescape(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut it = bytes.iter();
    while let Some(&b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match it.next() {
            Some(b'\\') => out.push(b'\\'),
            Some(b't') => out.push(b'\t'),
            Some(b'n') => out.push(b'\n'),
            Some(b'r') => out.push(b'\r'),
            Some(&other) => {
                return Err(format!(
                    "unknown escape \\{}; write a backslash as \\\\ (escapes: \\\\ \\t \\n \\r)",
                    char::from(other).escape_default()
                ));
            }
            None => return Err("a lone backslash ends the line; write it as \\\\".into()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_round_trips_every_byte_and_leaves_one_line() {
        let all: Vec<u8> = (0..=255u8).chain(*b"\\t\\n\t\n\r\\").collect();
        let mut out = Vec::new();
        write_escaped(&mut out, &all).unwrap();
        assert!(!out.contains(&b'\n') && !out.contains(&b'\t') && !out.contains(&b'\r'));
        assert_eq!(unescape(&out).unwrap(), all);
        assert!(
            unescape(b"c:\\temp\\x")
                .unwrap_err()
                .contains("unknown escape \\x")
        );
        assert!(unescape(b"end\\").is_err());
    }
}
