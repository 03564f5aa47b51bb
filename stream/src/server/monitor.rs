//! The monitor feed: streams the requests this node serves to a `tideline monitor` or `top`
//! until it closes its stream.
//!
//! Owns: sampling, the tree filter, what one event may hold and packing events into
//! messages. Must never delay a request: events come from the [`crate::observe::Observer`]'s
//! bounded broadcast queue, and a monitor that reads too slowly loses events (counted in
//! `dropped`), never slows the node. Must never send a message over the message limit: an
//! event copies at most [`EVENT_FIELD_BYTES_MAX`] of a request's tree and key, and a message
//! is bounded in events and in bytes.

use std::sync::Arc;

use super::config::ServerConfig;
use crate::proto::{MonitorEvent, Request, Response};
use crate::wire::{FramedRecv, WireError, send_message};

/// Events sent to a monitor in one message at most.
const MONITOR_EVENTS_PER_MESSAGE: usize = 512;
/// Bytes of events (see [`event_bytes`]) in one message: no more event is added once they
/// reach it, so a message holds at most this plus one event (a few KiB).
const MONITOR_MESSAGE_BYTES_MAX: usize = 256 << 10;
/// Bytes an event takes besides its strings and key: two 8-byte numbers, a flag, and 8 bytes
/// of position and length for each string and the key (rounded up).
const EVENT_ENVELOPE_BYTES: usize = 64;

/// Bytes of a request's tree name, key, scan prefix or GTID set an event copies at most. A
/// longer one is cut there (text on the character boundary before) and [`CUT_MARK`]
/// appended, so a key longer than this in an event was cut. Keeps events small in the queue
/// and in messages: a request's key may be as large as a message before any node checks it.
pub(super) const EVENT_FIELD_BYTES_MAX: usize = 1024;
/// What ends a cut field: `…` (U+2026).
const CUT_MARK: &str = "\u{2026}";

/// `key` as an event copies it: at most [`EVENT_FIELD_BYTES_MAX`] bytes, then the mark.
pub(super) fn cut_bytes(key: &[u8]) -> Vec<u8> {
    match key.get(..EVENT_FIELD_BYTES_MAX) {
        Some(head) if head.len() < key.len() => [head, CUT_MARK.as_bytes()].concat(),
        _ => key.to_vec(),
    }
}

/// `text` as an event copies it: at most [`EVENT_FIELD_BYTES_MAX`] bytes, cut on a character
/// boundary, then the mark.
pub(super) fn cut_text(text: &str) -> String {
    if text.len() <= EVENT_FIELD_BYTES_MAX {
        return text.to_string();
    }
    let end = text.floor_char_boundary(EVENT_FIELD_BYTES_MAX);
    format!("{}{CUT_MARK}", &text[..end])
}

/// Bytes `e` adds to a `Monitor` message, counted generously.
fn event_bytes(e: &MonitorEvent) -> usize {
    EVENT_ENVELOPE_BYTES + e.remote.len() + e.kind.len() + e.tree.len() + e.key.len()
}

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
    let mut bytes = 0usize;
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
                        bytes += event_bytes(&e);
                        events.push(e);
                    }
                }
                Err(RecvError::Lagged(n)) => dropped += n,
                Err(RecvError::Closed) => return Ok(()),
            }
            if events.len() < MONITOR_EVENTS_PER_MESSAGE && bytes < MONITOR_MESSAGE_BYTES_MAX {
                next = feed.rx.try_recv().ok().map(Ok);
            }
        }
        if events.is_empty() && dropped == 0 {
            continue;
        }
        bytes = 0;
        let msg = Response::Monitor {
            events: std::mem::take(&mut events),
            dropped: std::mem::take(&mut dropped),
        };
        send_message(&mut send, &msg).await?;
    }
    let _ = send.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{FRAME_HEADER_BYTES, Limits, encode_message};

    #[test]
    fn a_monitor_message_of_the_largest_events_fits_the_message_limit() {
        let largest = MonitorEvent {
            ts_us: i64::MAX,
            remote: "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535".into(),
            kind: "bootstrap".into(),
            tree: cut_text(&"t".repeat(1 << 20)),
            key: cut_bytes(&[b'k'; 1 << 20]),
            latency_us: u64::MAX,
            ok: true,
        };
        let encoded = |events: Vec<MonitorEvent>| {
            let mut out = Vec::new();
            encode_message(&Response::Monitor { events, dropped: 0 }, &mut out).unwrap();
            out.len() - FRAME_HEADER_BYTES
        };
        // The count is generous: each event as sent is no larger than counted.
        assert!(
            encoded(vec![largest.clone(); 2]) - encoded(vec![largest.clone()])
                <= event_bytes(&largest)
        );
        // As many as the packing loop takes: until the bytes reach the bound, or the count.
        let (mut events, mut bytes) = (Vec::new(), 0);
        while events.len() < MONITOR_EVENTS_PER_MESSAGE && bytes < MONITOR_MESSAGE_BYTES_MAX {
            bytes += event_bytes(&largest);
            events.push(largest.clone());
        }
        let limit = Limits::default().message_bytes_max as usize;
        assert!(encoded(events) <= MONITOR_MESSAGE_BYTES_MAX + 2 * event_bytes(&largest));
        assert!(MONITOR_MESSAGE_BYTES_MAX + 2 * event_bytes(&largest) < limit);
    }
}
