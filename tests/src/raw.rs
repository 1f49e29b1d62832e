//! A deliberately low-level client for bad-input tests: it speaks frames
//! directly over QUIC so tests can send what `shuffle-client` never would
//! (malformed frames, oversized headers, corrupt blocks, lying totals).

use std::{net::SocketAddr, path::Path, time::Duration};

use bytes::{Bytes, BytesMut};
use shuffle_protocol::{
    AppId, Frame, FrameKind, PROTOCOL_VERSION, Request, Response, decode_frame, frame::encode_frame,
};
use tokio::io::AsyncReadExt;

/// A QUIC connection that has said `Hello`.
pub struct RawConnection {
    pub endpoint: quinn::Endpoint,
    pub connection: quinn::Connection,
}

/// What a server sent back on one stream.
#[derive(Debug)]
pub struct Reply {
    /// Responses in order.
    pub responses: Vec<Response>,
    /// Number of block frames received.
    pub blocks: usize,
}

impl Reply {
    /// The first error response, if any.
    pub fn error(&self) -> Option<&shuffle_protocol::ServiceError> {
        self.responses.iter().find_map(|r| match r {
            Response::Error(e) => Some(e),
            _ => None,
        })
    }
}

/// A request frame's bytes.
pub fn request_bytes(request: &Request) -> Bytes {
    encode_frame(FrameKind::Request, &request.encode())
}

/// A QUIC client configuration trusting the PEM certificate at `cert`, with
/// the service's transport settings.
pub fn client_config(cert: &Path) -> quinn::ClientConfig {
    shuffle_bench::baseline::quic_client_config(cert).expect("client config for the test certificate")
}

impl RawConnection {
    /// Connects and sends `Hello` for `app`; returns the server's answer to it too.
    pub async fn connect(addr: SocketAddr, cert: &Path, app: &str, token: Option<&str>) -> (Self, Reply) {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("endpoint");
        endpoint.set_default_client_config(client_config(cert));
        let connection = endpoint.connect(addr, "localhost").expect("connect").await.expect("handshake");
        let raw = Self { endpoint, connection };
        let hello = Request::Hello {
            protocol_version: PROTOCOL_VERSION,
            app: AppId::new(app).expect("app id"),
            auth_token: token.map(str::to_string),
        };
        let reply = raw.exchange(&[request_bytes(&hello)]).await;
        (raw, reply)
    }

    /// Opens a stream, sends `chunks`, finishes, and collects everything the server sends back.
    pub async fn exchange(&self, chunks: &[Bytes]) -> Reply {
        let (mut send, mut recv) = self.connection.open_bi().await.expect("open stream");
        for chunk in chunks {
            if send.write_all(chunk).await.is_err() {
                break; // the server stopped the stream; its reply says why
            }
        }
        let _ = send.finish();
        let mut buf = BytesMut::new();
        let mut reply = Reply { responses: Vec::new(), blocks: 0 };
        let read = async {
            loop {
                while let Ok(Some(Frame { kind, payload })) = decode_frame(&mut buf) {
                    match kind {
                        FrameKind::Response => reply.responses.push(Response::decode(&payload).expect("response")),
                        FrameKind::Block => reply.blocks += 1,
                        FrameKind::Request => panic!("server sent a request frame"),
                    }
                }
                match recv.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), read).await.expect("server reply within 20 s");
        reply
    }
}
