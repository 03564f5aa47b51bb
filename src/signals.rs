//! The signals that stop a command or the node: SIGINT (Ctrl-C) and SIGTERM.
//!
//! Owns: [`StopSignals`], the one way every long-running command (`serve`, `connect`, `load`,
//! `monitor`, `top`, `sink file`) listens for them.
//!
//! Must never: be made anew inside a loop. Once a listener exists, tokio's handler replaces
//! the default action for the life of the process, so a listener made in each `select!` would
//! miss a signal landing while none is alive (while a branch runs: a line or a screen written
//! to a full stdout pipe, a batch committed), and the command would run on.

use anyhow::Context;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// SIGINT and SIGTERM, each listened for from [`StopSignals::install`] on.
pub(crate) struct StopSignals {
    sigint: Signal,
    sigterm: Signal,
}

impl StopSignals {
    /// Installs both listeners (inside a tokio runtime).
    pub(crate) fn install() -> anyhow::Result<StopSignals> {
        Ok(StopSignals {
            sigint: signal(SignalKind::interrupt()).context("install the SIGINT handler")?,
            sigterm: signal(SignalKind::terminate()).context("install the SIGTERM handler")?,
        })
    }

    /// The next SIGINT or SIGTERM (at once for one that arrived since the last call): its
    /// name and the exit code a shell gives a command that signal ended (128 + its number).
    /// Cancel-safe: usable as a `select!` branch.
    pub(crate) async fn recv(&mut self) -> (&'static str, u8) {
        tokio::select! {
            _ = self.sigint.recv() => ("SIGINT", 130),
            _ = self.sigterm.recv() => ("SIGTERM", 143),
        }
    }
}
