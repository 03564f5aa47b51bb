//! How a [`Tail`](super::Tail) ends cleanly ([`Tail::close`](super::Tail::close)): the
//! request to the run loop, the final ack of the slot, the wait until the node shows it, and
//! the connection's close.
//!
//! Must never: ack a slot past what the checkpoint holds, or take longer than [`CLOSE_WAIT`].

use std::future::Future;
use std::sync::Mutex;
use std::task::Poll;
use std::time::Duration;

use tideline_stream::{Client, Subscription};
use tokio::sync::watch;

use super::{Settle, Store, TailConfig, ack_offset, lock};
use crate::position::Position;

/// [`Tail::close`]'s request to the run loop, with the position of what the application
/// processed (`None`: it has none).
#[derive(Debug, Clone)]
pub(super) struct CloseRequest {
    pub(super) processed: Option<Position>,
}

/// The run loop's side of [`Tail::close`]: `Some` once the application asked the tail to end.
pub(super) type Closing = watch::Receiver<Option<CloseRequest>>;

/// The most [`Tail::close`] takes to end the subscription (the final ack, waiting for the node
/// to take it, and the connection's close), so that a node out of reach cannot hang an
/// application that is stopping. Past it the tail is dropped: the node ends the subscription
/// at its idle timeout, and the slot holds the log from its last ack on.
pub(super) const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// How long [`Tail::close`] waits for the node to show the final ack before it closes the
/// connection anyway.
const CLOSE_ACK_WAIT: Duration = Duration::from_secs(1);

/// Between two looks at the node's slots while [`Tail::close`] waits for the final ack.
const CLOSE_ACK_POLL: Duration = Duration::from_millis(10);

/// `f`, or `None` once the tail is asked to close (dropping `f`: the run loop then ends).
pub(super) async fn unless_closed<T>(
    closing: &mut Closing,
    f: impl Future<Output = T>,
) -> Option<T> {
    let mut f = std::pin::pin!(f);
    // Ends with an error once the `Tail` is gone: nobody reads on then either.
    let mut closed = std::pin::pin!(closing.wait_for(Option::is_some));
    std::future::poll_fn(|cx| {
        if closed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        f.as_mut().poll(cx).map(Some)
    })
    .await
}

/// Whether the application asked the tail to close, and what it processed then.
pub(super) fn close_requested(closing: &Closing) -> Option<CloseRequest> {
    closing.borrow().clone()
}

/// Whether the node has taken an ack of `slot` through `offset`, as its status shows it (the
/// slot's `restart_offset` past `offset`), asking again until it has. `false` when the node
/// cannot tell: it does not list its slots in its status, the slot is gone or invalidated, or
/// the status request failed.
async fn ack_taken(client: &Client, slot: &str, offset: u64) -> bool {
    loop {
        let Ok(text) = client.status().await else {
            return false;
        };
        let Ok(status) = serde_json::from_str::<serde_json::Value>(&text) else {
            return false;
        };
        let Some(slots) = status.get("slots").and_then(serde_json::Value::as_array) else {
            return false;
        };
        let Some(s) = slots.iter().find(|s| s["name"] == slot) else {
            return false;
        };
        if s["state"] != "active" {
            return false;
        }
        match s["restart_offset"].as_u64() {
            Some(restart) if restart > offset => return true,
            Some(_) => tokio::time::sleep(CLOSE_ACK_POLL).await,
            None => return false,
        }
    }
}

/// The ack [`goodbye`] sends (see [`ack_offset`]): none once the node refused one (the
/// subscription is over).
pub(super) fn final_ack(
    checkpoint: &Mutex<Store>,
    processed: Option<&Position>,
    server: uuid::Uuid,
    st: &Settle,
    ack_refused: bool,
) -> Option<u64> {
    if ack_refused {
        return None;
    }
    ack_offset(&lock(checkpoint), processed, server, st)
}

/// Ends a subscription for [`Tail::close`]: acks the slot through `ack`, waits (up to
/// [`CLOSE_ACK_WAIT`]) until the node has taken that ack, and closes the connection with code
/// 0, so that the node ends the subscription, and frees its slot, at once instead of at its
/// idle timeout.
///
/// The wait is needed because closing a QUIC connection discards the stream data the node's
/// application has not read yet, the ack among it; the node does not answer acks, so its
/// status is where the ack shows. A node whose status does not list its slots is taken at its
/// word after one round trip.
pub(super) async fn goodbye(
    cfg: &TailConfig,
    client: Client,
    mut sub: Subscription,
    ack: Option<u64>,
) {
    if let (Some(slot), Some(o)) = (&cfg.slot, ack) {
        match sub.ack(o).await {
            Ok(()) => {
                if tokio::time::timeout(CLOSE_ACK_WAIT, ack_taken(&client, slot, o))
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        addr = %cfg.addr, slot = %slot, offset = o,
                        "tail: the node did not show the final ack of the slot in time; closing \
                         anyway (the slot holds the log from its previous ack on)"
                    );
                }
            }
            Err(e) => tracing::warn!(
                addr = %cfg.addr, slot = %slot, error = %e,
                "tail: the final ack of the slot was not sent; the slot holds the log from its \
                 previous ack on"
            ),
        }
    }
    drop(sub);
    client.close().await;
}
