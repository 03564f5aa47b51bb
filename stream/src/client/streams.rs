//! The streams a [`Client`] keeps open: subscriptions, bootstraps and monitors, each on its
//! own QUIC stream, opened with a request and read event by event.
//!
//! Owns: [`Client::subscribe`], [`Client::bootstrap`], [`Client::monitor`] and the stream
//! types they return.
//!
//! Must never: acknowledge on its own: an offset or a stored chunk is acknowledged only when
//! the caller says so ([`Subscription::ack`], [`ChunkAcker::stored`]).

use tideline_wal::{Epoch, GtidSet, Transaction};
use uuid::Uuid;

use super::{Client, ClientError};
use crate::proto::{
    BootstrapResume, Chunk, Frame, MonitorEvent, RawBatch, Request, Response, Start,
};
use crate::wire::{FramedRecv, WireError, send_message};

impl Client {
    /// Opens a subscription on its own stream.
    pub async fn subscribe(
        &self,
        start: Start,
        tree: Option<String>,
        prefix: Option<Vec<u8>>,
        slot: Option<String>,
    ) -> Result<Subscription, ClientError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        send_message(
            &mut send,
            &Request::Subscribe {
                start,
                tree,
                prefix,
                slot,
            },
        )
        .await?;
        let mut recv = FramedRecv::new(recv, self.cfg.limits);
        match recv.next_message::<Response>().await? {
            Some(Response::Subscribed {
                next_offset,
                head,
                gtids_before,
                epoch,
            }) => Ok(Subscription {
                send,
                recv,
                next_offset,
                head,
                gtids_before: parse_gtids(&gtids_before)?,
                epoch: Epoch::new(epoch),
            }),
            Some(Response::Error { code, message }) => Err(ClientError::Server { code, message }),
            Some(other) => Err(ClientError::Unexpected(format!("{other:?}"))),
            None => Err(ClientError::Unexpected(
                "the node closed the subscription stream".into(),
            )),
        }
    }

    /// Starts (or, with `resume`, resumes) a bootstrap on its own stream. See
    /// [`BootstrapStream`] and `tideline_consumers::bootstrap` for the merging end.
    pub async fn bootstrap(
        &self,
        resume: Option<BootstrapResume>,
        chunk_bytes: u64,
    ) -> Result<BootstrapStream, ClientError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        send_message(
            &mut send,
            &Request::Bootstrap {
                resume,
                chunk_bytes,
            },
        )
        .await?;
        let mut recv = FramedRecv::new(recv, self.cfg.limits);
        match recv.next_message::<Response>().await? {
            Some(Response::BootstrapStarted {
                server_uuid,
                after_offset,
                keys_estimate,
                bytes_estimate,
                epoch,
            }) => Ok(BootstrapStream {
                recv,
                send: Some(send),
                server_uuid: Uuid::from_bytes(server_uuid),
                after_offset,
                keys_estimate,
                bytes_estimate,
                epoch: Epoch::new(epoch),
            }),
            Some(Response::Error { code, message }) => Err(ClientError::Server { code, message }),
            Some(other) => Err(ClientError::Unexpected(format!("{other:?}"))),
            None => Err(ClientError::Unexpected(
                "the node closed the bootstrap stream".into(),
            )),
        }
    }

    /// Attaches a live monitor: every request the node serves (on `tree`, a `sample_ppm`
    /// share of them) arrives as a [`MonitorEvent`] until the returned stream is dropped.
    pub async fn monitor(
        &self,
        tree: Option<String>,
        sample_ppm: u32,
    ) -> Result<MonitorStream, ClientError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        send_message(&mut send, &Request::Monitor { tree, sample_ppm }).await?;
        let mut recv = FramedRecv::new(recv, self.cfg.limits);
        match recv.next_message::<Response>().await? {
            Some(Response::MonitorStarted) => Ok(MonitorStream { _send: send, recv }),
            Some(Response::Error { code, message }) => Err(ClientError::Server { code, message }),
            Some(other) => Err(ClientError::Unexpected(format!("{other:?}"))),
            None => Err(ClientError::Unexpected(
                "the node closed the monitor stream (a node older than the monitor?)".into(),
            )),
        }
    }
}

fn parse_gtids(text: &str) -> Result<GtidSet, ClientError> {
    text.parse()
        .map_err(|e| ClientError::Unexpected(format!("bad GTID set from the node: {e}")))
}

/// What a subscription yields. `B` is how records come: owned transactions
/// ([`Subscription::next`]) or a [`RawBatch`] read in place ([`Subscription::next_raw`]).
#[derive(Debug)]
pub enum Event<B = Vec<Transaction>> {
    /// Records, in offset order.
    Batch(B),
    /// The server is alive; its head.
    Heartbeat {
        /// Visible head.
        head: u64,
        /// Server clock.
        server_time_us: i64,
    },
    /// A filtered subscription: every record through `through` was considered (sent or
    /// dropped by the filter); `gtids` is every GTID covered through it.
    Progress {
        /// Last offset considered.
        through: u64,
        /// GTIDs covered through `through`.
        gtids: GtidSet,
    },
}

/// One subscription stream.
#[derive(Debug)]
pub struct Subscription {
    send: quinn::SendStream,
    recv: FramedRecv,
    next_offset: u64,
    head: u64,
    gtids_before: GtidSet,
    epoch: Epoch,
}

impl Subscription {
    /// The server's history epoch: `next_offset` and every offset received are offsets of
    /// that history (see [`Epoch`]).
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The offset the server started from.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Every GTID covered before [`Subscription::next_offset`]: the history before the start
    /// point (for a GTID start, the set asked with). Count it as seen.
    pub fn gtids_before(&self) -> &GtidSet {
        &self.gtids_before
    }

    /// The server's head when the subscription started.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// The next event, with records decoded into owned transactions; `None` when the server
    /// ended the subscription cleanly.
    pub async fn next(&mut self) -> Result<Option<Event>, ClientError> {
        Ok(match self.next_raw().await? {
            None => None,
            Some(Event::Batch(b)) => Some(Event::Batch(b.decode().map_err(WireError::from)?)),
            Some(Event::Heartbeat {
                head,
                server_time_us,
            }) => Some(Event::Heartbeat {
                head,
                server_time_us,
            }),
            Some(Event::Progress { through, gtids }) => Some(Event::Progress { through, gtids }),
        })
    }

    /// The next event, with records as they arrived: one buffer per batch, every record's
    /// frame checked (CRC32C), nothing decoded or copied until the caller reads a record (see
    /// [`RawBatch`]). For consumers that forward records or read a few fields. Delivers what
    /// the server sent: the order and duplicate checks of [`ClientSubscription`] are the
    /// caller's (`tideline_consumers` runs them on owned transactions).
    ///
    /// [`ClientSubscription`]: crate::proto::ClientSubscription
    pub async fn next_raw(&mut self) -> Result<Option<Event<RawBatch>>, ClientError> {
        match self.recv.next_raw::<Response>().await? {
            None => Ok(None),
            Some(Frame::Batch(b)) => Ok(Some(Event::Batch(b))),
            Some(Frame::Message(Response::Heartbeat {
                head,
                server_time_us,
            })) => Ok(Some(Event::Heartbeat {
                head,
                server_time_us,
            })),
            Some(Frame::Message(Response::Progress { through, gtids })) => {
                Ok(Some(Event::Progress {
                    through,
                    gtids: parse_gtids(&gtids)?,
                }))
            }
            Some(Frame::Message(Response::Error { code, message })) => {
                Err(ClientError::Server { code, message })
            }
            Some(Frame::Message(other)) => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Acknowledges processing through `offset` (moves the slot, if any).
    pub async fn ack(&mut self, offset: u64) -> Result<(), ClientError> {
        send_message(&mut self.send, &Request::Ack { offset }).await?;
        Ok(())
    }
}

/// A live monitor (see [`Client::monitor`]); dropping it detaches.
#[derive(Debug)]
pub struct MonitorStream {
    _send: quinn::SendStream,
    recv: FramedRecv,
}

impl MonitorStream {
    /// The next events, oldest first, and how many this monitor missed by reading too slowly
    /// since the previous call; `None` when the node ended the stream.
    pub async fn next(&mut self) -> Result<Option<(Vec<MonitorEvent>, u64)>, ClientError> {
        match self.recv.next_message::<Response>().await? {
            None => Ok(None),
            Some(Response::Monitor { events, dropped }) => Ok(Some((events, dropped))),
            Some(Response::Error { code, message }) => Err(ClientError::Server { code, message }),
            Some(other) => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }
}

/// What a bootstrap stream carries, in order.
#[derive(Debug)]
pub enum BootstrapEvent {
    /// Live log records, densely after the previous ones.
    Records(Vec<Transaction>),
    /// A part of a chunk of a tree.
    Chunk(Chunk),
    /// The secondary indexes of the tree whose chunk follows (see
    /// [`Response::BootstrapIndexes`]).
    Indexes {
        /// The tree.
        tree: String,
        /// Its merge operator.
        merge_operator: Option<String>,
        /// Its index definitions.
        indexes: Vec<crate::proto::IndexDef>,
    },
    /// The copy is complete at `offset`, where the server had executed `gtid_executed`.
    Done {
        /// Handover offset.
        offset: u64,
        /// GTID set text.
        gtid_executed: String,
    },
}

/// The receiving side of [`Client::bootstrap`].
#[derive(Debug)]
pub struct BootstrapStream {
    recv: FramedRecv,
    send: Option<quinn::SendStream>,
    /// The server.
    pub server_uuid: Uuid,
    /// Live records after this offset follow.
    pub after_offset: u64,
    /// Estimated keys (progress only).
    pub keys_estimate: u64,
    /// Estimated bytes (progress only).
    pub bytes_estimate: u64,
    /// The server's history epoch the copy is taken in; store it with the progress.
    pub epoch: Epoch,
}

/// Tells the server how many chunks of a bootstrap stream are stored; it sends the next chunk
/// only then. Taken from [`BootstrapStream::take_acker`] by whoever stores the chunks.
#[derive(Debug)]
pub struct ChunkAcker {
    send: quinn::SendStream,
}

impl ChunkAcker {
    /// `chunks` chunks of this stream are stored.
    pub async fn stored(&mut self, chunks: u64) -> Result<(), ClientError> {
        send_message(&mut self.send, &Request::ChunksStored { chunks }).await?;
        Ok(())
    }
}

impl BootstrapStream {
    /// The acknowledging half (once).
    pub fn take_acker(&mut self) -> Option<ChunkAcker> {
        self.send.take().map(|send| ChunkAcker { send })
    }

    /// The next event; `None` if the server ended the stream without `Done` (an error).
    pub async fn next(&mut self) -> Result<Option<BootstrapEvent>, ClientError> {
        Ok(match self.recv.next::<Response>().await? {
            None => None,
            Some(Frame::Batch(txns)) => Some(BootstrapEvent::Records(txns)),
            Some(Frame::Message(Response::Chunk(c))) => Some(BootstrapEvent::Chunk(c)),
            Some(Frame::Message(Response::BootstrapIndexes {
                tree,
                merge_operator,
                indexes,
            })) => Some(BootstrapEvent::Indexes {
                tree,
                merge_operator,
                indexes,
            }),
            Some(Frame::Message(Response::BootstrapDone {
                offset,
                gtid_executed,
            })) => Some(BootstrapEvent::Done {
                offset,
                gtid_executed,
            }),
            Some(Frame::Message(Response::Error { code, message })) => {
                return Err(ClientError::Server { code, message });
            }
            Some(Frame::Message(other)) => {
                return Err(ClientError::Unexpected(format!("{other:?}")));
            }
        })
    }
}
