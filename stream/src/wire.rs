//! The thin I/O shell around [`crate::proto`]: frames over quinn streams.

use crate::proto::{self, Frame, FrameDecoder, Limits, ProtoError, RawBatch};

/// Errors reading or writing frames on a stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The peer broke the protocol.
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// Reading failed (connection lost, stream reset). The cause is in the message, not in
    /// `source()`, so that a chain printer (`{:#}`) shows it once.
    #[error("read failed: {0}")]
    Read(quinn::ReadError),
    /// Writing failed (connection lost, stream stopped by the peer).
    #[error("write failed: {0}")]
    Write(quinn::WriteError),
}

impl From<quinn::ReadError> for WireError {
    fn from(e: quinn::ReadError) -> Self {
        WireError::Read(e)
    }
}

impl From<quinn::WriteError> for WireError {
    fn from(e: quinn::WriteError) -> Self {
        WireError::Write(e)
    }
}

/// Frames read from a quinn receive stream.
#[derive(Debug)]
pub struct FramedRecv {
    recv: quinn::RecvStream,
    dec: FrameDecoder,
    /// The decoder's limits: [`FramedRecv::next_message`] tells a batch header refused for its
    /// length by them.
    limits: Limits,
}

impl FramedRecv {
    /// Wraps a stream, enforcing `limits`. A stream that must carry messages only is best
    /// read with `batch_bytes_max` 0: a batch on it is then refused at its header, before its
    /// body is read (see [`FramedRecv::next_message`]).
    pub fn new(recv: quinn::RecvStream, limits: Limits) -> Self {
        FramedRecv {
            recv,
            dec: FrameDecoder::new(limits),
            limits,
        }
    }

    /// The next frame, or `None` at a clean end of stream.
    pub async fn next<M>(&mut self) -> Result<Option<Frame<M>>, WireError>
    where
        M: rkyv::Archive,
        M::Archived: for<'a> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>,
            > + rkyv::Deserialize<M, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
    {
        Ok(match self.next_raw::<M>().await? {
            None => None,
            Some(Frame::Message(m)) => Some(Frame::Message(m)),
            Some(Frame::Batch(b)) => Some(Frame::Batch(b.decode()?)),
        })
    }

    /// The next frame with a batch kept as the buffer it arrived in (see [`RawBatch`]), or
    /// `None` at a clean end of stream.
    pub async fn next_raw<M>(&mut self) -> Result<Option<Frame<M, RawBatch>>, WireError>
    where
        M: rkyv::Archive,
        M::Archived: for<'a> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>,
            > + rkyv::Deserialize<M, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
    {
        loop {
            if let Some(frame) = self.dec.next_raw_frame::<M>()? {
                return Ok(Some(frame));
            }
            // `needed` has checked the header against the limits: reading on is bounded.
            let want = self.dec.needed()?.max(1);
            match self.recv.read_chunk(want.max(1 << 20), true).await? {
                Some(chunk) => self.dec.feed(&chunk.bytes),
                None => {
                    if self.dec.buffered() > 0 {
                        return Err(ProtoError::Truncated.into());
                    }
                    return Ok(None);
                }
            }
        }
    }

    /// The next frame, which must be a message. A batch is refused as such (`a batch where a
    /// message was expected`), its records never decoded, whether it arrived whole, failed its
    /// frame checks, or was refused at its header for its length: with `batch_bytes_max` 0,
    /// every batch header but an empty one's is, so no batch body is read at all.
    pub async fn next_message<M>(&mut self) -> Result<Option<M>, WireError>
    where
        M: rkyv::Archive,
        M::Archived: for<'a> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>,
            > + rkyv::Deserialize<M, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
    {
        let refused = || ProtoError::Violation("a batch where a message was expected".into());
        match self.next_raw::<M>().await {
            Ok(None) => Ok(None),
            Ok(Some(Frame::Message(m))) => Ok(Some(m)),
            Ok(Some(Frame::Batch(_))) => Err(refused().into()),
            Err(WireError::Proto(e)) if self.is_batch_error(&e) => Err(refused().into()),
            Err(e) => Err(e),
        }
    }

    /// Whether `e` can only have come from a batch frame: a batch that failed its frame
    /// checks, or a header over the batch limit that is not the message limit (a header of
    /// either kind over a limit both share is not told apart, and keeps its own error).
    fn is_batch_error(&self, e: &ProtoError) -> bool {
        match e {
            ProtoError::BadBatch(_) => true,
            ProtoError::FrameTooLarge { max, .. } => {
                *max == self.limits.batch_bytes_max && *max != self.limits.message_bytes_max
            }
            _ => false,
        }
    }

    /// Tells the peer to stop sending.
    pub fn stop(&mut self, code: u32) {
        let _ = self.recv.stop(quinn::VarInt::from_u32(code));
    }
}

/// Writes one message frame.
pub async fn send_message<M>(send: &mut quinn::SendStream, msg: &M) -> Result<(), WireError>
where
    M: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                rkyv::util::AlignedVec,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rkyv::rancor::Error,
            >,
        >,
{
    let mut buf = Vec::new();
    proto::encode_message(msg, &mut buf)?;
    send.write_all(&buf).await?;
    Ok(())
}
