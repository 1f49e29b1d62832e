//! The transport layer under the protocol: frames on one request's byte
//! streams, whatever carries them, and the QUIC settings derived from the
//! memory budget.
//!
//! Handlers see a [`FrameReader`] over any `AsyncRead` and a [`FrameWriter`]
//! over any [`FrameSink`]; a QUIC stream pair and a Unix socket are the two
//! implementations. The reader decodes with the protocol's one
//! [`FrameDecoder`] and holds a [`Reservation`] for its buffers: before it
//! allocates room for more of a frame it waits until its consumer may grow,
//! so a stream whose shuffle is over its share of memory simply stops being
//! read, and QUIC flow control (or the socket buffer) holds the sender.

use std::{os::fd::BorrowedFd, sync::Arc, time::Duration};

use bytes::Bytes;
use shuffle_protocol::{
    ErrorKind, Frame, FrameDecoder, FrameKind, Request, Response, ServiceError, encode_frame, encode_frame_header,
    limits,
};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::memory::{Consumer, Reservation};

/// Share of the memory budget that QUIC receive and send windows may take
/// over all connections (percent): with the default 1 GiB budget, 256 MiB,
/// which is 64 connections of 2 MiB windows each way.
pub const TRANSPORT_SHARE_PERCENT: u64 = 25;
/// Per-connection window the budget should afford: below it one stream
/// cannot keep a loopback or data-centre link busy, so a large budget gives
/// up connections (down to [`MIN_CONNECTIONS`]) before window.
pub const MIN_CONNECTION_WINDOW: u64 = 1 << 20;
/// Authenticated connections a server admits at least (while its windows
/// stay above [`FLOOR_CONNECTION_WINDOW`]): a small budget shrinks windows
/// first, so that dozens of clients (two connections each) still fit.
pub const MIN_CONNECTIONS: usize = 64;
/// The smallest window ever used: a few dozen packets in flight.
pub const FLOOR_CONNECTION_WINDOW: u64 = 64 << 10;
/// Largest per-connection window: more does not make one connection faster.
pub const MAX_CONNECTION_WINDOW: u64 = 64 << 20;
/// Receive window of a connection until its `Hello` succeeds: room for the
/// `Hello` (at most [`MAX_HELLO_FRAME`]) and little else, so connections
/// that never authenticate cannot make the server buffer anything.
pub const HELLO_WINDOW: u32 = 16 << 10;
/// Largest `Hello` frame: an app id, a secret and a token fit many times over.
pub const MAX_HELLO_FRAME: usize = 4096;

/// The flow-control windows of QUIC connections, derived from the budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Windows {
    /// Receive window of one authenticated connection (and of each stream).
    pub connection: u64,
    /// Send window of one connection (unacknowledged data held for a reader).
    pub send: u64,
    /// Authenticated connections served at once: the configured limit, or
    /// fewer if that many windows would not fit the transport's share of the
    /// budget. (Connections still saying `Hello` have a tiny window and
    /// count only against the configured limit.)
    pub max_connections: usize,
}

impl Windows {
    /// Windows for a budget of `budget` bytes and at most `max_connections` connections.
    pub fn for_budget(budget: u64, max_connections: usize) -> Self {
        // Each connection has a receive and a send window.
        let share = budget / 100 * TRANSPORT_SHARE_PERCENT;
        let wanted = max_connections.max(1) as u64;
        let mut per = (share / (2 * wanted)).clamp(MIN_CONNECTION_WINDOW, MAX_CONNECTION_WINDOW);
        let at_least = wanted.min(MIN_CONNECTIONS as u64);
        if share / (2 * per) < at_least {
            per = (share / (2 * at_least)).max(FLOOR_CONNECTION_WINDOW);
        }
        let fit = (share / (2 * per)).max(1) as usize;
        Self { connection: per, send: per, max_connections: max_connections.min(fit) }
    }

    /// Bytes all connections' windows may hold at most.
    pub fn worst_case(&self) -> u64 {
        (self.connection + self.send) * self.max_connections as u64
            + u64::from(HELLO_WINDOW) * self.max_connections as u64
    }
}

/// QUIC transport parameters of the server: a small window until `Hello`
/// (raised by [`authenticated`]), one stream until then, keep-alives.
pub fn server_transport(windows: Windows, idle_timeout: Duration, max_udp_payload: u16) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(1u8.into())
        .max_concurrent_uni_streams(0u8.into())
        .stream_receive_window(quinn::VarInt::from_u64(windows.connection).unwrap_or(quinn::VarInt::MAX))
        .receive_window(HELLO_WINDOW.into())
        .send_window(windows.send)
        .initial_rtt(Duration::from_micros(limits::INITIAL_RTT_MICROS))
        .keep_alive_interval(Some(idle_timeout / 3))
        .max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    apply_mtu(&mut t, max_udp_payload);
    Arc::new(t)
}

/// The coordinator's transport: control messages only (every request on
/// its own stream, at most one frame each way), so modest windows.
pub fn coordinator_transport(idle_timeout: Duration, max_udp_payload: u16) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(256u32.into())
        .max_concurrent_uni_streams(0u8.into())
        .stream_receive_window(quinn::VarInt::from_u32(MAX_COORDINATOR_WINDOW))
        .receive_window(quinn::VarInt::from_u32(MAX_COORDINATOR_WINDOW))
        .initial_rtt(Duration::from_micros(limits::INITIAL_RTT_MICROS))
        .keep_alive_interval(Some(idle_timeout / 3))
        .max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    apply_mtu(&mut t, max_udp_payload);
    Arc::new(t)
}

/// A coordinator connection's receive window, 16 MiB: one largest frame
/// (a `CommitMap` naming every partition) in flight per connection.
pub const MAX_COORDINATOR_WINDOW: u32 = 16 << 20;

/// Path-MTU discovery up to `max_udp_payload` (jumbo frames where the network has them).
pub fn apply_mtu(t: &mut quinn::TransportConfig, max_udp_payload: u16) {
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(max_udp_payload.max(1200));
    t.mtu_discovery_config(Some(mtu));
}

/// Opens an authenticated connection's windows and streams.
pub fn authenticated(connection: &quinn::Connection, windows: Windows, max_streams: u32) {
    connection.set_receive_window(quinn::VarInt::from_u64(windows.connection).unwrap_or(quinn::VarInt::MAX));
    connection.set_max_concurrent_bi_streams(max_streams.into());
}

/// A byte sink that takes whole chunks, so block bytes can be handed over without copying.
pub trait FrameSink: Send {
    /// Writes all `chunks`, in order.
    fn write_chunks(&mut self, chunks: &mut [Bytes]) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Writes `frame` with the open file `fd` passed beside it (Unix sockets only).
    fn write_with_fd<'a>(
        &'a mut self,
        frame: &'a [u8],
        fd: BorrowedFd<'a>,
    ) -> impl Future<Output = std::io::Result<()>> + Send + 'a {
        let _ = (frame, fd);
        async { Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "this stream cannot pass files")) }
    }
    /// Ends the stream after everything written.
    fn finish(&mut self);
    /// Waits (at most `timeout`) until the peer has received everything written.
    fn flushed(&mut self, timeout: Duration) -> impl Future<Output = ()> + Send;
}

impl FrameSink for quinn::SendStream {
    async fn write_chunks(&mut self, chunks: &mut [Bytes]) -> std::io::Result<()> {
        self.write_all_chunks(chunks).await.map_err(std::io::Error::from)
    }

    fn finish(&mut self) {
        let _ = quinn::SendStream::finish(self);
    }

    async fn flushed(&mut self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.stopped()).await;
    }
}

/// A [`FrameSink`] over any byte stream that is not QUIC: a Unix socket's
/// write half, or an in-memory pipe in tests. Chunks go out with vectored
/// writes; finishing shuts the stream's write side.
pub struct StreamSink<W>(pub W);

impl<W: tokio::io::AsyncWrite + Unpin + Send + StreamSocket> FrameSink for StreamSink<W> {
    async fn write_chunks(&mut self, chunks: &mut [Bytes]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        let (mut index, mut offset) = (0, 0);
        while index < chunks.len() {
            let slices: Vec<std::io::IoSlice<'_>> = std::iter::once(&chunks[index][offset..])
                .chain(chunks[index + 1..].iter().map(|c| &c[..]))
                .take(64)
                .map(std::io::IoSlice::new)
                .collect();
            let mut n = self.0.write_vectored(&slices).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            while n > 0 && index < chunks.len() {
                let left = chunks[index].len() - offset;
                if n >= left {
                    n -= left;
                    index += 1;
                    offset = 0;
                } else {
                    offset += n;
                    n = 0;
                }
            }
        }
        Ok(())
    }

    fn write_with_fd<'a>(
        &'a mut self,
        frame: &'a [u8],
        fd: BorrowedFd<'a>,
    ) -> impl Future<Output = std::io::Result<()>> + Send + 'a {
        self.0.send_with_fd(frame, fd)
    }

    fn finish(&mut self) {
        self.0.shutdown_write();
    }

    async fn flushed(&mut self, _timeout: Duration) {
        // What was written is in the peer's receive buffer already.
    }
}

/// What a non-QUIC stream can do besides writing bytes.
pub trait StreamSocket {
    /// Shuts the write side without waiting (the peer sees end of stream).
    fn shutdown_write(&mut self);

    /// Writes `frame` with `fd` passed beside its first byte (`SCM_RIGHTS`).
    fn send_with_fd<'a>(
        &'a mut self,
        frame: &'a [u8],
        fd: BorrowedFd<'a>,
    ) -> impl Future<Output = std::io::Result<()>> + Send + 'a {
        let _ = (frame, fd);
        async { Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "this stream cannot pass files")) }
    }
}

impl StreamSocket for tokio::net::unix::OwnedWriteHalf {
    fn shutdown_write(&mut self) {
        let _ = rustix::net::shutdown(self.as_ref(), rustix::net::Shutdown::Write);
    }

    async fn send_with_fd<'a>(&'a mut self, frame: &'a [u8], fd: BorrowedFd<'a>) -> std::io::Result<()> {
        use std::mem::MaybeUninit;

        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        use tokio::io::{AsyncWriteExt, Interest};
        let stream: &tokio::net::UnixStream = self.as_ref();
        let sent = loop {
            stream.writable().await?;
            let attempt = stream.try_io(Interest::WRITABLE, || {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                let fds = [fd];
                control.push(SendAncillaryMessage::ScmRights(&fds));
                rustix::net::sendmsg(stream, &[std::io::IoSlice::new(frame)], &mut control, SendFlags::NOSIGNAL)
                    .map_err(std::io::Error::from)
            });
            match attempt {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        // The descriptor went with the first byte; the rest of the frame follows as plain bytes.
        self.write_all(&frame[sent..]).await
    }
}

impl StreamSocket for tokio::io::WriteHalf<tokio::io::DuplexStream> {
    fn shutdown_write(&mut self) {
        // An in-memory pipe ends when its write half is shut down; do it without waiting.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let _ = tokio::io::AsyncWrite::poll_shutdown(std::pin::Pin::new(self), &mut cx);
    }
}

/// Reads frames from one stream, accounting for its buffers.
pub struct FrameReader<R> {
    /// The stream.
    inner: R,
    /// Frames received in part.
    decoder: FrameDecoder,
    /// The decoder's buffers in the budget.
    memory: Reservation,
    /// Whether to wait for room before allocating (not while reading a
    /// `Hello`, which is small and must never queue behind other apps).
    waits: bool,
}

impl<R: AsyncRead + Unpin + Send> FrameReader<R> {
    /// Reads frames of at most `max_len` bytes from `inner`, accounting its buffers to `consumer`.
    pub fn new(inner: R, consumer: &Arc<Consumer>, max_len: usize) -> Self {
        Self { inner, decoder: FrameDecoder::new(max_len), memory: consumer.empty(), waits: true }
    }

    /// A reader for a connection's `Hello`: frames of at most
    /// [`MAX_HELLO_FRAME`] bytes, accounted without waiting (their memory is
    /// bounded by the connection limit times that size).
    pub fn for_hello(inner: R, consumer: &Arc<Consumer>) -> Self {
        Self { waits: false, ..Self::new(inner, consumer, MAX_HELLO_FRAME) }
    }

    /// After a `Hello`: frames up to `max_len`, accounted to `consumer`, waiting for room.
    pub fn after_hello(&mut self, consumer: &Arc<Consumer>, max_len: usize) {
        self.set_max_len(max_len);
        self.account_to(consumer);
        self.waits = true;
    }

    /// Moves the account of this stream's buffers to `consumer` (a push
    /// stream's buffers count against its shuffle's share).
    pub fn account_to(&mut self, consumer: &Arc<Consumer>) {
        let memory = std::mem::replace(&mut self.memory, consumer.empty());
        self.memory = memory.transfer(consumer);
    }

    /// Accepts frames up to `max_len` bytes from now on.
    pub fn set_max_len(&mut self, max_len: usize) {
        let old = std::mem::replace(&mut self.decoder, FrameDecoder::new(max_len));
        // Only called between frames, when nothing is buffered but an empty staging buffer.
        debug_assert!(old.is_between_frames());
        self.memory.resize(self.decoder.buffered_capacity());
    }

    /// The next frame with its payload's share of the budget; `None` when
    /// the stream ended cleanly between frames. Waits for room in the budget
    /// before it allocates for more of a frame.
    pub async fn next_frame(&mut self) -> Result<Option<(Frame, Reservation)>, ServiceError> {
        loop {
            let before = self.decoder.buffered_capacity();
            if let Some(frame) = self.decoder.next_frame()? {
                // A large payload leaves with its buffer; a small one was copied out.
                let released = before - self.decoder.buffered_capacity();
                let mut memory = self.memory.split(released);
                memory.grow(frame.payload.len().saturating_sub(memory.size()));
                return Ok(Some((frame, memory)));
            }
            if self.waits {
                self.memory.grow_wait(self.decoder.next_allocation()).await?;
            }
            let (buf, limit) = self.decoder.read_buf();
            let mut limited = bytes::BufMut::limit(buf, limit);
            let n = self
                .inner
                .read_buf(&mut limited)
                .await
                .map_err(|e| ServiceError::new(ErrorKind::Io, format!("reading from the stream: {e}")))?;
            self.memory.resize(self.decoder.buffered_capacity());
            if n == 0 {
                if self.decoder.is_between_frames() {
                    return Ok(None);
                }
                return Err(ServiceError::new(
                    ErrorKind::Malformed,
                    format!("stream ended inside a frame ({} bytes of it received)", self.decoder.partial_len()),
                ));
            }
        }
    }

    /// The next frame, which must be a request.
    pub async fn next_request(&mut self) -> Result<Option<Request>, ServiceError> {
        match self.next_frame().await? {
            None => Ok(None),
            Some((Frame { kind: FrameKind::Request, payload }, _)) => Ok(Some(Request::decode(&payload)?)),
            Some((frame, _)) => Err(ServiceError::new(
                ErrorKind::UnexpectedMessage,
                format!("expected a request frame, got a {:?} frame", frame.kind),
            )),
        }
    }

    /// The next frame, which must be a response.
    pub async fn next_response(&mut self) -> Result<Option<Response>, ServiceError> {
        match self.next_frame().await? {
            None => Ok(None),
            Some((Frame { kind: FrameKind::Response, payload }, _)) => Ok(Some(Response::decode(&payload)?)),
            Some((frame, _)) => Err(ServiceError::new(
                ErrorKind::UnexpectedMessage,
                format!("expected a response frame, got a {:?} frame", frame.kind),
            )),
        }
    }

    /// The stream, for transports that read more than frames from it.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

/// Writes frames to one stream.
pub struct FrameWriter<W> {
    /// The stream.
    inner: W,
}

fn write_error(e: std::io::Error) -> ServiceError {
    ServiceError::new(ErrorKind::Io, format!("writing to the stream: {e}"))
}

impl<W: FrameSink> FrameWriter<W> {
    /// Writes frames to `inner`.
    pub fn new(inner: W) -> Self {
        Self { inner }
    }

    /// Sends one response frame.
    pub async fn response(&mut self, response: &Response) -> Result<(), ServiceError> {
        let frame = encode_frame(FrameKind::Response, &response.encode())?;
        self.inner.write_chunks(&mut [frame]).await.map_err(write_error)
    }

    /// Sends one request frame (cluster processes talking to each other).
    pub async fn request(&mut self, request: &Request) -> Result<(), ServiceError> {
        let frame = encode_frame(FrameKind::Request, &request.encode())?;
        self.inner.write_chunks(&mut [frame]).await.map_err(write_error)
    }

    /// Sends blocks, each in its own frame, without copying their bytes.
    pub async fn blocks(&mut self, blocks: &[Bytes]) -> Result<(), ServiceError> {
        let mut chunks = Vec::with_capacity(blocks.len() * 2);
        for block in blocks {
            chunks.push(Bytes::copy_from_slice(&encode_frame_header(FrameKind::Block, block.len())?));
            chunks.push(block.clone());
        }
        self.inner.write_chunks(&mut chunks).await.map_err(write_error)
    }

    /// Ends the stream and waits briefly for the peer to receive it, so a
    /// closing error is not lost when the connection closes right after.
    pub async fn finish_and_flush(&mut self) {
        self.inner.finish();
        self.inner.flushed(Duration::from_secs(1)).await;
    }

    /// Ends the stream.
    pub fn finish(&mut self) {
        self.inner.finish();
    }

    /// Sends a response frame with the open file `fd` passed beside it.
    pub async fn response_with_fd(&mut self, response: &Response, fd: BorrowedFd<'_>) -> Result<(), ServiceError> {
        let frame = encode_frame(FrameKind::Response, &response.encode())?;
        self.inner.write_with_fd(&frame, fd).await.map_err(write_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_fit_the_transport_share_of_the_budget() {
        let w = Windows::for_budget(1 << 30, 1024);
        assert_eq!(w.connection, MIN_CONNECTION_WINDOW, "1 GiB / 4 / 1024 is below the minimum");
        assert!((MIN_CONNECTIONS..1024).contains(&w.max_connections), "so fewer connections are admitted: {w:?}");
        let w = Windows::for_budget(64 << 30, 1024);
        assert!(w.connection >= 7 << 20 && w.max_connections == 1024, "{w:?}");
        let w = Windows::for_budget(8 << 20, 1024);
        assert!(w.connection < MIN_CONNECTION_WINDOW && w.max_connections >= 12, "small budgets shrink windows: {w:?}");
        for budget in [16 << 20, 256 << 20, 1 << 30, 64 << 30] {
            let w = Windows::for_budget(budget, 1024);
            let hello = u64::from(HELLO_WINDOW) * w.max_connections as u64;
            assert!(w.worst_case() <= budget / 4 + hello + (8 << 20), "{w:?} for {budget}");
        }
    }

    #[tokio::test]
    async fn a_frame_header_with_no_payload_costs_only_the_first_allocation() {
        let pool = crate::memory::MemoryPool::new(64 << 20);
        let consumer = pool.consumer("test");
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut reader = FrameReader::new(server, &consumer, shuffle_protocol::MAX_FRAME_LEN);
        use tokio::io::AsyncWriteExt;
        client.write_all(&encode_frame_header(FrameKind::Block, 16 << 20).unwrap()).await.unwrap();
        let pending = tokio::time::timeout(Duration::from_millis(50), reader.next_frame()).await;
        assert!(pending.is_err(), "no frame yet");
        assert!(consumer.used() <= 256 << 10, "{} bytes held for a header", consumer.used());
        drop(client);
        let err = reader.next_frame().await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Malformed);
    }

    #[tokio::test]
    async fn a_received_block_carries_its_own_reservation() {
        let pool = crate::memory::MemoryPool::new(64 << 20);
        let consumer = pool.consumer("test");
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut reader = FrameReader::new(server, &consumer, shuffle_protocol::MAX_FRAME_LEN);
        use tokio::io::AsyncWriteExt;
        client.write_all(&encode_frame(FrameKind::Block, &vec![3u8; 70_000]).unwrap()).await.unwrap();
        let (frame, memory) = reader.next_frame().await.unwrap().unwrap();
        assert_eq!((frame.payload.len(), memory.size()), (70_000, 70_000));
        drop(frame);
        drop(memory);
        assert!(consumer.used() <= 8192, "only the staging buffer is left: {}", consumer.used());
    }
}
