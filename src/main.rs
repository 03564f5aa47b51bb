//! The `tideline` binary: everything it does is in the library (`tideline::run`).

use std::process::ExitCode;

fn main() -> ExitCode {
    tideline::run()
}
