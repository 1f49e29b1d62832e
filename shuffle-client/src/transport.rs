//! The client's transport seam: request streams over whatever reaches the
//! server, and frames on them with the protocol's one [`FrameDecoder`].
//!
//! A [`Link`] is one way to reach a server (a QUIC connection, or the
//! server's Unix socket on the same host); every request opens a stream pair
//! on it. Writers and readers only see [`StreamSend`] and [`FrameReader`],
//! so a transport is a variant here and a file of its own, not a rewrite.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use shuffle_protocol::{Frame, FrameDecoder, FrameKind, Request, Response, encode_frame, limits};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::{ClientError, unix};

/// The sending half of a request stream.
pub(crate) enum StreamSend {
    Quic(quinn::SendStream),
    Unix(unix::UnixSend),
}

/// Why a write failed.
pub(crate) enum SendError {
    /// The server stopped reading the stream; its reason is on the receiving half.
    Stopped,
    /// The stream or connection broke.
    Lost(ClientError),
}

impl StreamSend {
    /// Writes `chunks` in order without copying them (QUIC) or with one vectored write (Unix).
    pub async fn write_chunks(&mut self, chunks: &mut [Bytes]) -> Result<(), SendError> {
        match self {
            Self::Quic(send) => match send.write_all_chunks(chunks).await {
                Ok(()) => Ok(()),
                Err(quinn::WriteError::Stopped(_)) => Err(SendError::Stopped),
                Err(quinn::WriteError::ConnectionLost(e)) => Err(SendError::Lost(e.into())),
                Err(other) => Err(SendError::Lost(ClientError::ConnectionLost(other.to_string()))),
            },
            Self::Unix(send) => send.write_chunks(chunks).await,
        }
    }

    /// Ends the stream after what was written.
    pub fn finish(&mut self) {
        match self {
            Self::Quic(send) => {
                let _ = send.finish();
            }
            Self::Unix(send) => send.finish(),
        }
    }

    /// Abandons the stream: the server discards what it carried.
    pub fn reset(&mut self) {
        match self {
            Self::Quic(send) => {
                let _ = send.reset(0u32.into());
            }
            Self::Unix(send) => send.reset(),
        }
    }
}

/// The receiving half of a request stream.
pub(crate) enum StreamRecv {
    Quic(quinn::RecvStream),
    Unix(unix::UnixRecv),
}

impl AsyncRead for StreamRecv {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Quic(recv) => Pin::new(recv).poll_read(cx, buf),
            Self::Unix(recv) => Pin::new(recv).poll_read(cx, buf),
        }
    }
}

/// Reads frames from one stream.
pub(crate) struct FrameReader {
    inner: StreamRecv,
    decoder: FrameDecoder,
}

impl FrameReader {
    pub fn new(inner: StreamRecv) -> Self {
        Self { inner, decoder: FrameDecoder::default() }
    }

    /// The next frame; `None` when the stream ended cleanly between frames.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>, ClientError> {
        loop {
            if let Some(frame) = self.decoder.next_frame().map_err(|e| ClientError::Protocol(e.to_string()))? {
                return Ok(Some(frame));
            }
            let (buf, limit) = self.decoder.read_buf();
            let mut limited = bytes::BufMut::limit(buf, limit);
            let n = self.inner.read_buf(&mut limited).await.map_err(|e| ClientError::ConnectionLost(e.to_string()))?;
            if n == 0 {
                if self.decoder.is_between_frames() {
                    return Ok(None);
                }
                return Err(ClientError::ConnectionLost("stream ended inside a frame".into()));
            }
        }
    }

    /// The next frame, which must be a response (an error response becomes `Err`).
    pub async fn response(&mut self) -> Result<Response, ClientError> {
        match self.next_frame().await? {
            Some(Frame { kind: FrameKind::Response, payload }) => match Response::decode(&payload) {
                Ok(Response::Error(e)) => Err(ClientError::Server(e)),
                Ok(response) => Ok(response),
                Err(e) => Err(ClientError::Protocol(e.to_string())),
            },
            Some(frame) => Err(ClientError::Protocol(format!("expected a response, got a {:?} frame", frame.kind))),
            None => Err(ClientError::ConnectionLost("stream ended before the server's response".into())),
        }
    }

    /// A file descriptor received beside the frames (direct reads on the Unix socket).
    pub fn take_fd(&mut self) -> Option<std::os::fd::OwnedFd> {
        match &mut self.inner {
            StreamRecv::Unix(recv) => recv.take_fd(),
            StreamRecv::Quic(_) => None,
        }
    }

    /// Asks a Unix stream to receive file descriptors beside its bytes.
    pub fn receive_files(&mut self) {
        if let StreamRecv::Unix(recv) = &mut self.inner {
            recv.receive_files();
        }
    }

    /// The stream back; only between frames (nothing buffered is lost).
    pub fn into_stream(self) -> StreamRecv {
        debug_assert!(self.decoder.is_between_frames());
        self.inner
    }
}

/// One way to reach a server.
#[derive(Clone)]
pub(crate) enum Link {
    /// A QUIC connection (its `Hello` done).
    Quic(quinn::Connection),
    /// The server's Unix socket: every stream is a socket of its own.
    Unix(Arc<unix::UnixLink>),
}

impl Link {
    /// Opens a request stream.
    pub async fn open(&self) -> Result<(StreamSend, FrameReader), ClientError> {
        match self {
            Self::Quic(connection) => {
                let (send, recv) = connection.open_bi().await?;
                Ok((StreamSend::Quic(send), FrameReader::new(StreamRecv::Quic(recv))))
            }
            Self::Unix(link) => {
                let (send, recv) = link.open().await?;
                Ok((StreamSend::Unix(send), FrameReader::new(StreamRecv::Unix(recv))))
            }
        }
    }

    /// Closes the link.
    pub fn close(&self) {
        match self {
            Self::Quic(connection) => connection.close(0u32.into(), b"client closed"),
            Self::Unix(link) => link.close(),
        }
    }

    /// Whether the link can carry no more streams: its QUIC connection was
    /// closed (by the server restarting, say). A Unix link connects each
    /// stream anew, so it never is.
    pub fn is_closed(&self) -> bool {
        match self {
            Self::Quic(connection) => connection.close_reason().is_some(),
            Self::Unix(_) => false,
        }
    }

    /// Whether this link is the same-host Unix socket.
    pub fn is_unix(&self) -> bool {
        matches!(self, Self::Unix(_))
    }
}

/// A request frame.
pub(crate) fn request_frame(request: &Request) -> Result<Bytes, ClientError> {
    encode_frame(FrameKind::Request, &request.encode()).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// Opens a stream, sends one request, and returns the stream for what follows.
pub(crate) async fn open_request(
    link: &Link,
    request: &Request,
    finish: bool,
) -> Result<(StreamSend, FrameReader), ClientError> {
    let (mut send, mut reader) = link.open().await?;
    match send.write_chunks(&mut [request_frame(request)?]).await {
        Ok(()) => {}
        Err(SendError::Stopped) => return Err(reader.response().await.err().unwrap_or(stopped())),
        Err(SendError::Lost(e)) => return Err(e),
    }
    if finish {
        send.finish();
    }
    Ok((send, reader))
}

fn stopped() -> ClientError {
    ClientError::ConnectionLost("the server stopped the stream".into())
}

/// QUIC transport parameters of the client (see `shuffle_protocol::limits`).
pub(crate) fn transport_config(idle_timeout: Duration, max_udp_payload: u16) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(0u8.into())
        .max_concurrent_uni_streams(0u8.into())
        .stream_receive_window(limits::CLIENT_STREAM_RECEIVE_WINDOW.into())
        .receive_window(limits::CLIENT_CONNECTION_RECEIVE_WINDOW.into())
        .send_window(limits::CONNECTION_SEND_WINDOW)
        .initial_rtt(Duration::from_micros(limits::INITIAL_RTT_MICROS))
        .keep_alive_interval(Some(idle_timeout / 3))
        .max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(max_udp_payload.max(1200));
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}
