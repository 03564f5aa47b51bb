//! The `tideline` binary: everything it does is in the library (`tideline::run`).

use std::process::ExitCode;

/// mimalloc instead of the system allocator: a write makes a dozen short-lived allocations
/// (keys, values, log records, store batch items) across threads, and glibc's malloc spent
/// about a tenth of a write's instructions on them (docs/DEPENDENCIES.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tideline::run()
}
