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
}

impl FramedRecv {
    /// Wraps a stream, enforcing `limits`.
    pub fn new(recv: quinn::RecvStream, limits: Limits) -> Self {
        FramedRecv {
            recv,
            dec: FrameDecoder::new(limits),
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

    /// The next frame, which must be a message. A batch is refused as it is, its records
    /// never decoded.
    pub async fn next_message<M>(&mut self) -> Result<Option<M>, WireError>
    where
        M: rkyv::Archive,
        M::Archived: for<'a> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>,
            > + rkyv::Deserialize<M, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
    {
        match self.next_raw::<M>().await? {
            None => Ok(None),
            Some(Frame::Message(m)) => Ok(Some(m)),
            Some(Frame::Batch(_)) => {
                Err(ProtoError::Violation("a batch where a message was expected".into()).into())
            }
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
