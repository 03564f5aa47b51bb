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
use futures_util::{FutureExt as _, StreamExt as _};

use super::message::Message;
use crate::sink::SinkError;

/// What JetStream answers to a publish: the stream that stored it, or an error.
#[derive(serde::Deserialize)]
struct Ack {
    stream: Option<String>,
    error: Option<AckError>,
}

/// JetStream errors a publish meets again however often it is sent: 10054, the message is
/// larger than the stream's `max_msg_size`; 10109, the stream is sealed.
const PERMANENT: [u64; 2] = [10054, 10109];

#[derive(serde::Deserialize)]
struct AckError {
    /// HTTP-like status: 4xx the request is refused, 5xx the server could not take it now.
    #[serde(default)]
    code: u16,
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
    /// ack. Each message's id moves into its header (`msgs` are built per attempt). An error
    /// leaves some messages possibly stored: the caller publishes the batch again, and the
    /// stream drops the repeats by their ids.
    pub(crate) async fn publish(
        &mut self,
        msgs: &mut [Message],
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
        // The reply subjects `INBOX.SEQ` of the whole batch in one buffer, each a slice of it.
        let mut replies = Vec::with_capacity(msgs.len() * (self.inbox.len() + 12));
        let mut ends = Vec::with_capacity(msgs.len());
        for i in 0..msgs.len() as u64 {
            replies.extend_from_slice(self.inbox.as_bytes());
            replies.push(b'.');
            crate::envelope::push_u64(&mut replies, first + i);
            ends.push(replies.len());
        }
        let replies = bytes::Bytes::from(replies);
        let mut start = 0;
        for i in 0..msgs.len() {
            while i - batch.done >= s.max_in_flight {
                self.receive(msgs, &mut batch, s).await?;
            }
            let reply = Subject::try_from(replies.slice(start..ends[i]))
                .expect("an inbox and a number are ASCII");
            start = ends[i];
            let m = &mut msgs[i];
            let mut headers = HeaderMap::new();
            if s.with_id {
                headers.insert(NATS_MESSAGE_ID, std::mem::take(&mut m.id));
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

    /// Waits for the next ack and takes it and every other ack already received off the
    /// subscription, marking their messages; an ack of another batch is skipped.
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
            })?;
        let mut answer = Some(answer);
        while let Some(a) = answer {
            let a = a.ok_or_else(|| {
                SinkError::Retry("the NATS connection closed while acks were awaited".into())
            })?;
            self.mark(&a, msgs, batch, s)?;
            // The acks that are already here, without a timer each.
            let acks = self.acks.as_mut().expect("taken only on drop");
            answer = acks.next().now_or_never();
        }
        Ok(())
    }

    /// Checks the ack `answer` and marks its message.
    fn mark(
        &self,
        answer: &async_nats::Message,
        msgs: &[Message],
        batch: &mut Progress,
        s: &Settings<'_>,
    ) -> Result<(), SinkError> {
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
        if !is_plain_ack(&answer.payload, s.stream) {
            check_answer(answer, &msgs[i].subject, s.stream)?;
        }
        if !std::mem::replace(&mut batch.acked[i], true) {
            batch.done += 1;
        }
        Ok(())
    }
}

/// Whether `payload` is certainly a positive ack from `stream`: it opens with
/// `{"stream":"STREAM",` (nats-server writes an error's fields before and instead of the
/// ack's) and names no error. Anything else goes to [`check_answer`].
fn is_plain_ack(payload: &[u8], stream: &str) -> bool {
    const OPEN: &[u8] = b"{\"stream\":\"";
    let Some(rest) = payload.strip_prefix(OPEN) else {
        return false;
    };
    let Some(rest) = rest.strip_prefix(stream.as_bytes()) else {
        return false;
    };
    rest.starts_with(b"\",") && !payload.windows(7).any(|w| w == b"\"error\"")
}

/// Checks an answer to a publish of `subject` that is not a plain ack: an error, or an ack
/// from another stream, becomes the sink's error.
fn check_answer(
    answer: &async_nats::Message,
    subject: &Subject,
    stream: &str,
) -> Result<(), SinkError> {
    let subject = subject.as_str();
    if answer.status == Some(StatusCode::NO_RESPONDERS) {
        return Err(SinkError::Hold(format!(
            "no JetStream stream captures subject {subject:?}: add it to the subjects of \
             stream {stream:?}"
        )));
    }
    let ack: Ack = serde_json::from_slice(&answer.payload).map_err(|e| {
        SinkError::Retry(format!(
            "NATS answered the publish to {subject} with something not an ack ({e}): {}",
            String::from_utf8_lossy(&answer.payload)
        ))
    })?;
    if let Some(e) = ack.error {
        let msg = format!(
            "NATS publish to {subject}: {} (JetStream error {})",
            e.description, e.err_code
        );
        // Refused for good: the same batch would be refused again, so an operator must
        // change the stream or the pipeline. Other 4xx answers pass (409: the same id is
        // being stored by an earlier try).
        if (400..500).contains(&e.code) && PERMANENT.contains(&e.err_code) {
            return Err(SinkError::Hold(format!(
                "{msg}: stream {stream:?} refuses the message; change the stream (its \
                 max_msg_size, or unseal it) or the pipeline (per = \"op\" makes smaller \
                 messages)"
            )));
        }
        return Err(SinkError::Retry(msg));
    }
    match ack.stream.as_deref() {
        Some(s) if s == stream => Ok(()),
        other => Err(SinkError::Hold(format!(
            "subject {subject:?} is captured by stream {other:?}, not {stream:?}: make the \
             subjects of the two streams disjoint"
        ))),
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

#[cfg(test)]
mod tests {
    use super::is_plain_ack;

    /// The fast path may only ever accept a positive ack of the configured stream: anything
    /// else (another stream, a stream whose name merely starts alike, an error) must go to
    /// the full check.
    #[test]
    fn only_a_positive_ack_of_the_stream_is_plain() {
        assert!(is_plain_ack(br#"{"stream":"TL","seq":12}"#, "TL"));
        assert!(is_plain_ack(
            br#"{"stream":"TL","seq":12,"duplicate":true}"#,
            "TL"
        ));
        assert!(!is_plain_ack(br#"{"stream":"TL2","seq":12}"#, "TL"));
        assert!(!is_plain_ack(br#"{"stream":"T","seq":12}"#, "TL"));
        assert!(!is_plain_ack(br#"{"stream":"TL"}"#, "TL"));
        assert!(!is_plain_ack(
            br#"{"error":{"code":503,"err_code":10077,"description":"no space"}}"#,
            "TL"
        ));
        assert!(!is_plain_ack(
            br#"{"stream":"TL","error":{"code":400,"description":"x"}}"#,
            "TL"
        ));
        assert!(!is_plain_ack(b"", "TL"));
    }
}
