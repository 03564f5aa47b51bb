//! The monitor feed: streams the requests this node serves to a `tideline monitor` or `top`
//! until it closes its stream.
//!
//! Owns: sampling, the tree filter, and packing events into messages. Must never delay a
//! request: events come from the [`crate::observe::Observer`]'s bounded broadcast queue, and a
//! monitor that reads too slowly loses events (counted in `dropped`), never slows the node.

use std::sync::Arc;

use super::config::ServerConfig;
use crate::proto::{Request, Response};
use crate::wire::{FramedRecv, WireError, send_message};

/// Events sent to a monitor in one message at most.
const MONITOR_EVENTS_PER_MESSAGE: usize = 512;

/// Streams the requests this node serves to one monitor until it closes its stream.
pub(super) async fn serve_monitor(
    cfg: Arc<ServerConfig>,
    mut send: quinn::SendStream,
    mut recv: FramedRecv,
    tree: Option<String>,
    sample_ppm: u32,
) -> Result<(), WireError> {
    use tokio::sync::broadcast::error::RecvError;
    let mut feed = cfg.observer.attach_monitor();
    send_message(&mut send, &Response::MonitorStarted).await?;
    let sample_ppm = sample_ppm.min(1_000_000);
    let mut events = Vec::new();
    let mut dropped = 0u64;
    loop {
        // Wait for one event (or the monitor leaving), then take what else is queued.
        let first = tokio::select! {
            r = feed.rx.recv() => r,
            _ = recv.next_message::<Request>() => break,
            _ = send.stopped() => break,
        };
        let mut next = Some(first);
        while let Some(r) = next.take() {
            match r {
                Ok(e) => {
                    let wanted = tree.as_deref().is_none_or(|t| t == e.tree)
                        && (sample_ppm >= 1_000_000
                            || rand::random_range(0..1_000_000u32) < sample_ppm);
                    if wanted {
                        events.push(e);
                    }
                }
                Err(RecvError::Lagged(n)) => dropped += n,
                Err(RecvError::Closed) => return Ok(()),
            }
            if events.len() < MONITOR_EVENTS_PER_MESSAGE {
                next = feed.rx.try_recv().ok().map(Ok);
            }
        }
        if events.is_empty() && dropped == 0 {
            continue;
        }
        let msg = Response::Monitor {
            events: std::mem::take(&mut events),
            dropped: std::mem::take(&mut dropped),
        };
        send_message(&mut send, &msg).await?;
    }
    let _ = send.finish();
    Ok(())
}
