//! Frames on one request stream, client side: the mirror of the server's
//! transport layer, over QUIC streams.

use std::{sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use shuffle_protocol::{Frame, FrameKind, Request, Response, decode_frame, frame::encode_frame, limits};
use tokio::io::AsyncReadExt;

use crate::ClientError;

/// Bytes asked of the stream per read; a 64 KiB block takes one or two reads.
const READ_CHUNK: usize = 256 * 1024;

/// Reads frames from one stream.
pub struct FrameReader {
    /// The stream.
    recv: quinn::RecvStream,
    /// Bytes received but not yet decoded.
    buf: BytesMut,
}

impl FrameReader {
    pub fn new(recv: quinn::RecvStream) -> Self {
        Self { recv, buf: BytesMut::with_capacity(READ_CHUNK) }
    }

    /// The next frame; `None` when the stream ended cleanly between frames.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>, ClientError> {
        loop {
            if let Some(frame) = decode_frame(&mut self.buf).map_err(|e| ClientError::Protocol(e.to_string()))? {
                return Ok(Some(frame));
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            let n = self.recv.read_buf(&mut self.buf).await.map_err(|e| ClientError::ConnectionLost(e.to_string()))?;
            if n == 0 {
                if self.buf.is_empty() {
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
}

/// A request frame.
pub fn request_frame(request: &Request) -> Bytes {
    encode_frame(FrameKind::Request, &request.encode())
}

/// Opens a stream, sends one request, and returns the stream for what follows.
pub async fn open_request(
    connection: &quinn::Connection,
    request: &Request,
    finish: bool,
) -> Result<(quinn::SendStream, FrameReader), ClientError> {
    let (mut send, recv) = connection.open_bi().await?;
    send.write_all_chunks(&mut [request_frame(request)]).await.map_err(write_error)?;
    if finish {
        let _ = send.finish();
    }
    Ok((send, FrameReader::new(recv)))
}

/// Turns a stream write error into a client error.
pub fn write_error(e: quinn::WriteError) -> ClientError {
    match e {
        quinn::WriteError::ConnectionLost(e) => e.into(),
        other => ClientError::ConnectionLost(other.to_string()),
    }
}

/// QUIC transport parameters, the same as the server's (see `shuffle_protocol::limits`).
pub fn transport_config(idle_timeout: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(0u8.into())
        .max_concurrent_uni_streams(0u8.into())
        .stream_receive_window(limits::STREAM_RECEIVE_WINDOW.into())
        .receive_window(limits::CONNECTION_RECEIVE_WINDOW.into())
        .send_window(limits::CONNECTION_SEND_WINDOW)
        .initial_rtt(Duration::from_micros(limits::INITIAL_RTT_MICROS))
        .keep_alive_interval(Some(idle_timeout / 3))
        .max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    Arc::new(t)
}
