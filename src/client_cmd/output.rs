//! A command's result on standard output, written so that a reader that goes away (`tideline
//! status | head -2`, `... | true`) is the normal end of the output: not a panic, as
//! `println!` makes it ("failed printing to stdout: Broken pipe", exit 101), and not an error.
//!
//! Owns: the one place the one-shot commands (`status`, `verify`, `index`, `slot`, `put`,
//! `connect --check`, `demo`, `bench`, ...) write their results, and telling a closed pipe
//! from a real write failure. Must never: carry anything but results (progress, notes and
//! errors go to stderr). Streaming commands (`scan`, `tail`, `log dump`, `top`, `monitor`)
//! stop at the first closed-pipe write instead, with the same meaning.

use std::fmt;
use std::io::Write;

/// Writes `args` to standard output and flushes it.
///
/// A reader that has gone away drops the text and returns `Ok`: the command then runs to its
/// end and exits with its own code (0, or `verify`'s 1 for nodes that differ), every later
/// write being dropped the same way. Any other failure (a full disk under `> FILE`) is an
/// error that names standard output.
pub(crate) fn print_fmt(args: fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    quiet_if_closed(out.write_fmt(args).and_then(|()| out.flush()))
}

/// Writes `bytes` exactly to standard output and flushes it, as [`print_fmt`] does.
pub(crate) fn print_bytes(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    quiet_if_closed(out.write_all(bytes).and_then(|()| out.flush()))
}

/// `Ok` for a write that succeeded or found the reader gone; any other failure as an error.
fn quiet_if_closed(written: std::io::Result<()>) -> anyhow::Result<()> {
    match written {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("write the result to standard output"))
        }
        _ => Ok(()),
    }
}

/// `println!` for results: `outln!("{x}")?` writes a line through [`print_fmt`] (a closed pipe
/// is `Ok`, another write failure an error).
macro_rules! outln {
    () => {
        $crate::client_cmd::output::print_fmt(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::client_cmd::output::print_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use outln;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_pipe_is_the_end_of_the_output_and_other_failures_are_errors() {
        let closed = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(quiet_if_closed(Err(closed)).is_ok());
        assert!(quiet_if_closed(Ok(())).is_ok());
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        let err = quiet_if_closed(Err(full)).expect_err("a full disk is an error");
        assert!(
            crate::error_line(&err).starts_with("write the result to standard output: "),
            "{}",
            crate::error_line(&err)
        );
    }
}
