//! The sending side of one subscription stream, two batches deep: a finished batch is handed to
//! quinn at once (as much as the send window takes, without waiting), and the subscription goes
//! on to read the next batch while the rest of this one waits for room. Only when the next
//! batch is ready does it wait for the previous one to be written out.
//!
//! Owns: the stream's send half and the unwritten rest of at most one batch. Must never hold
//! more than that one batch besides the one its caller prepares (the consumer buffer counts
//! both, `ServerConfig::consumer_buffer_bytes`), and must never let a message overtake a batch
//! written before it: every write first finishes the batch in flight.

use std::future::Future;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use crate::proto::Response;
use crate::wire::{WireError, send_message};

/// A subscription's send half with at most one batch in flight.
pub(super) struct Outbox {
    send: quinn::SendStream,
    /// What quinn has not yet taken of the last batch (a view of its one buffer).
    rest: Option<Bytes>,
}

impl Outbox {
    pub(super) fn new(send: quinn::SendStream) -> Self {
        Outbox { send, rest: None }
    }

    /// Waits until quinn has taken every byte of the batch in flight (flow-control credit and
    /// room in the send window: back-pressure from a slow consumer stops here).
    pub(super) async fn flush(&mut self) -> Result<(), WireError> {
        if let Some(rest) = self.rest.take() {
            self.send.write_chunk(rest).await?;
        }
        Ok(())
    }

    /// Finishes the batch in flight, then hands `frame` to quinn without copying it: what the
    /// send window takes now goes at once, the rest waits for the next [`Outbox::flush`].
    pub(super) async fn send_batch(&mut self, frame: Bytes) -> Result<(), WireError> {
        self.flush().await?;
        let mut chunks = [frame];
        {
            // One poll: `write_chunks` is cancel safe, and a pending poll wrote nothing (the
            // no-op waker it leaves behind is replaced by the next `flush`'s own).
            let write = std::pin::pin!(self.send.write_chunks(&mut chunks));
            if let Poll::Ready(Err(e)) = write.poll(&mut Context::from_waker(Waker::noop())) {
                return Err(e.into());
            }
        }
        let [rest] = chunks;
        self.rest = (!rest.is_empty()).then_some(rest);
        Ok(())
    }

    /// Writes one message after the batch in flight.
    pub(super) async fn message(&mut self, msg: &Response) -> Result<(), WireError> {
        self.flush().await?;
        send_message(&mut self.send, msg).await
    }

    /// Resolves when the consumer stops the stream.
    pub(super) async fn stopped(&mut self) {
        let _ = self.send.stopped().await;
    }

    /// Ends the stream after what was written (a batch in flight is dropped unsent if the
    /// stream already failed; the consumer resumes from its position).
    pub(super) async fn finish(mut self) {
        if self.flush().await.is_ok() {
            let _ = self.send.finish();
        }
    }
}
