//! The transport layer under the protocol: reading and writing frames on one
//! request's byte streams, whatever carries them.
//!
//! Handlers see a [`FrameReader`] over any `AsyncRead` and a [`FrameWriter`]
//! over any [`FrameSink`]; QUIC streams are one implementation. A same-host
//! path (a Unix socket) plugs in here without touching handlers or storage.

use std::{future::Future, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use shuffle_protocol::{
    ErrorKind, Frame, FrameKind, Request, Response, ServiceError, decode_frame, encode_frame_header,
    frame::encode_frame, limits,
};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes asked of the stream per read while no frame is pending; large
/// enough that a 64 KiB block takes one or two reads.
const READ_CHUNK: usize = 256 * 1024;

/// A byte sink that takes whole chunks, so block bytes (from memory or a
/// file mapping) can be handed over without copying.
pub trait FrameSink: Send {
    /// Writes all `chunks`, in order.
    fn write_chunks(&mut self, chunks: &mut [Bytes]) -> impl Future<Output = std::io::Result<()>> + Send;
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

/// Reads frames from one stream.
pub struct FrameReader<R> {
    /// The stream.
    inner: R,
    /// Bytes received but not yet decoded.
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin + Send> FrameReader<R> {
    /// Reads frames from `inner`.
    pub fn new(inner: R) -> Self {
        Self { inner, buf: BytesMut::with_capacity(READ_CHUNK) }
    }

    /// The next frame; `None` when the stream ended cleanly between frames.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>, ServiceError> {
        loop {
            if let Some(frame) = decode_frame(&mut self.buf)? {
                return Ok(Some(frame));
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            let n = self
                .inner
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| ServiceError::new(ErrorKind::Io, format!("reading from the stream: {e}")))?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(ServiceError::new(
                    ErrorKind::Malformed,
                    format!("stream ended inside a frame ({} bytes of it received)", self.buf.len()),
                ));
            }
        }
    }

    /// The next frame, which must be a request.
    pub async fn next_request(&mut self) -> Result<Option<Request>, ServiceError> {
        match self.next_frame().await? {
            None => Ok(None),
            Some(Frame { kind: FrameKind::Request, payload }) => Ok(Some(Request::decode(&payload)?)),
            Some(frame) => Err(ServiceError::new(
                ErrorKind::UnexpectedMessage,
                format!("expected a request frame, got a {:?} frame", frame.kind),
            )),
        }
    }
}

/// Writes frames to one stream.
pub struct FrameWriter<W> {
    /// The stream.
    inner: W,
}

impl<W: FrameSink> FrameWriter<W> {
    /// Writes frames to `inner`.
    pub fn new(inner: W) -> Self {
        Self { inner }
    }

    /// Sends one response frame.
    pub async fn response(&mut self, response: &Response) -> std::io::Result<()> {
        self.inner.write_chunks(&mut [encode_frame(FrameKind::Response, &response.encode())]).await
    }

    /// Sends blocks, each in its own frame, without copying their bytes.
    pub async fn blocks(&mut self, blocks: &[Bytes]) -> std::io::Result<()> {
        let mut chunks = Vec::with_capacity(blocks.len() * 2);
        for block in blocks {
            chunks.push(Bytes::copy_from_slice(&encode_frame_header(FrameKind::Block, block.len())));
            chunks.push(block.clone());
        }
        self.inner.write_chunks(&mut chunks).await
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
}

/// QUIC transport parameters for server and client alike (see `shuffle_protocol::limits`).
pub fn transport_config(idle_timeout: Duration, max_streams: u32) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(max_streams.into())
        .max_concurrent_uni_streams(0u8.into())
        .stream_receive_window(limits::STREAM_RECEIVE_WINDOW.into())
        .receive_window(limits::CONNECTION_RECEIVE_WINDOW.into())
        .send_window(limits::CONNECTION_SEND_WINDOW)
        .initial_rtt(Duration::from_micros(limits::INITIAL_RTT_MICROS))
        .keep_alive_interval(Some(idle_timeout / 3))
        .max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    Arc::new(t)
}
