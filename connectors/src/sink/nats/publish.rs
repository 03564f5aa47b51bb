//! The ack window: publishes one batch's messages to JetStream with up to `max_in_flight`
//! acks outstanding, and returns only once every one of them is acked by the stream.
//!
//! Each message goes out as a core NATS publish whose reply subject is `INBOX.SEQ`, on the one
//! wildcard subscription `INBOX.*` the window holds for its connection; JetStream answers each
//! publish on its reply subject. SEQ counts the publishes of the window, so an ack is matched
//! to its message by number, and the answer to an earlier attempt (a batch that timed out and
//! is published again) is recognised and ignored. This costs a reply subject and a header per
//! message; async-nats' `send_publish` adds a future with a timer, a semaphore permit and a
//! request-map entry per message, which on a 2-core machine shared with the server is most of
//! the client's work.
//!
//! Owns: matching acks to messages and the window's bound. Must never: report a batch acked
//! while one of its messages has no positive ack from the configured stream.

use std::time::Duration;

use async_nats::header::{HeaderMap, NATS_MESSAGE_ID};
use async_nats::{Client, StatusCode, Subject, Subscriber};
use futures_util::StreamExt as _;

use super::message::Message;
use crate::sink::SinkError;

/// What JetStream answers to a publish: the stream that stored it, or an error.
#[derive(serde::Deserialize)]
struct Ack {
    stream: Option<String>,
    error: Option<AckError>,
}

#[derive(serde::Deserialize)]
struct AckError {
    #[serde(default)]
    description: String,
    #[serde(default)]
    err_code: u64,
}

/// A connection's publishes and the subscription their acks come back on.
pub(crate) struct AckWindow {
    client: Client,
    inbox: String,
    /// `None` only while the window is dropped.
    acks: Option<Subscriber>,
    /// The runtime the window was opened in: a subscription's drop spawns its unsubscribe.
    runtime: tokio::runtime::Handle,
    /// The sequence number of the next publish.
    next_seq: u64,
}

/// How one batch goes out.
pub(crate) struct Settings<'a> {
    /// The stream that must store every message.
    pub stream: &'a str,
    /// Publishes awaiting their ack at most.
    pub max_in_flight: usize,
    /// How long without any ack of the batch before it is given up (and retried).
    pub ack_timeout: Duration,
    /// Whether messages carry their `Nats-Msg-Id` (always, but for the crash tests' canary).
    pub with_id: bool,
}

impl AckWindow {
    /// Subscribes to a fresh inbox of `client` for the acks.
    pub(crate) async fn open(client: &Client) -> Result<AckWindow, SinkError> {
        let inbox = client.new_inbox();
        let acks = client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|e| SinkError::Retry(format!("NATS subscribe for publish acks: {e}")))?;
        Ok(AckWindow {
            client: client.clone(),
            inbox,
            acks: Some(acks),
            runtime: tokio::runtime::Handle::current(),
            next_seq: 0,
        })
    }

    /// Publishes `msgs` in order with at most `s.max_in_flight` unacked, and waits for every
    /// ack. An error leaves some messages possibly stored: the caller publishes the batch
    /// again, and the stream drops the repeats by their ids.
    pub(crate) async fn publish(
        &mut self,
        msgs: &[Message],
        s: &Settings<'_>,
    ) -> Result<(), SinkError> {
        assert!(
            s.max_in_flight > 0,
            "the config check refuses a window of 0"
        );
        let first = self.next_seq;
        let mut batch = Progress {
            first,
            acked: vec![false; msgs.len()],
            done: 0,
        };
        for (i, m) in msgs.iter().enumerate() {
            while i - batch.done >= s.max_in_flight {
                self.receive(msgs, &mut batch, s).await?;
            }
            let reply = Subject::from(format!("{}.{}", self.inbox, first + i as u64));
            let mut headers = HeaderMap::new();
            if s.with_id {
                headers.insert(NATS_MESSAGE_ID, m.id.as_str());
            }
            self.next_seq += 1;
            self.client
                .publish_with_reply_and_headers(
                    m.subject.clone(),
                    reply,
                    headers,
                    m.payload.clone(),
                )
                .await
                .map_err(|e| SinkError::Retry(format!("NATS publish to {}: {e}", m.subject)))?;
        }
        while batch.done < msgs.len() {
            self.receive(msgs, &mut batch, s).await?;
        }
        Ok(())
    }

    /// Takes the next ack off the subscription and marks its message; an ack of another
    /// batch is skipped.
    async fn receive(
        &mut self,
        msgs: &[Message],
        batch: &mut Progress,
        s: &Settings<'_>,
    ) -> Result<(), SinkError> {
        let acks = self.acks.as_mut().expect("taken only on drop");
        let answer = tokio::time::timeout(s.ack_timeout, acks.next())
            .await
            .map_err(|_| {
                SinkError::Retry(format!(
                    "NATS acked {} of {} messages, then nothing for {} ms: is the stream's \
                     server overloaded or restarting?",
                    batch.done,
                    msgs.len(),
                    s.ack_timeout.as_millis()
                ))
            })?
            .ok_or_else(|| {
                SinkError::Retry("the NATS connection closed while acks were awaited".into())
            })?;
        let seq = answer
            .subject
            .strip_prefix(self.inbox.as_str())
            .and_then(|t| t.strip_prefix('.'))
            .and_then(|t| t.parse::<u64>().ok());
        let Some(i) = seq
            .and_then(|q| q.checked_sub(batch.first))
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| i < msgs.len())
        else {
            // An earlier attempt's ack, arriving late: that attempt was given up.
            return Ok(());
        };
        let subject = msgs[i].subject.as_str();
        if answer.status == Some(StatusCode::NO_RESPONDERS) {
            return Err(SinkError::Hold(format!(
                "no JetStream stream captures subject {subject:?}: add it to the subjects of \
                 stream {:?}",
                s.stream
            )));
        }
        let ack: Ack = serde_json::from_slice(&answer.payload).map_err(|e| {
            SinkError::Retry(format!(
                "NATS answered the publish to {subject} with something not an ack ({e}): {}",
                String::from_utf8_lossy(&answer.payload)
            ))
        })?;
        if let Some(e) = ack.error {
            return Err(SinkError::Retry(format!(
                "NATS publish to {subject}: {} (JetStream error {})",
                e.description, e.err_code
            )));
        }
        match ack.stream.as_deref() {
            Some(stream) if stream == s.stream => {}
            other => {
                return Err(SinkError::Hold(format!(
                    "subject {subject:?} is captured by stream {other:?}, not {:?}: make the \
                     subjects of the two streams disjoint",
                    s.stream
                )));
            }
        }
        if !std::mem::replace(&mut batch.acked[i], true) {
            batch.done += 1;
        }
        Ok(())
    }
}

impl Drop for AckWindow {
    fn drop(&mut self) {
        // A sink may be dropped outside its runtime (after `block_on`, at a pipeline's end):
        // the subscription's drop spawns its unsubscribe, which needs one.
        let _runtime = self.runtime.enter();
        drop(self.acks.take());
    }
}

/// One batch's acks so far.
struct Progress {
    /// The sequence number of the batch's first message.
    first: u64,
    acked: Vec<bool>,
    /// How many are acked.
    done: usize,
}
