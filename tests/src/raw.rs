//! A deliberately low-level client for bad-input tests: it speaks frames
//! directly over QUIC so tests can send what `shuffle-client` never would
//! (malformed frames, oversized headers, corrupt blocks, lying totals).

use std::{net::SocketAddr, path::Path, time::Duration};

use bytes::Bytes;
use shuffle_protocol::{
    AppId, AppSecret, Frame, FrameDecoder, FrameKind, PROTOCOL_VERSION, Request, Response, encode_frame,
};

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
    /// The app secret a `Welcome` carried, if this was one.
    pub fn secret(&self) -> Option<AppSecret> {
        self.responses.iter().find_map(|r| match r {
            Response::Welcome { app_secret, .. } => Some(app_secret.clone()),
            _ => None,
        })
    }

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
    encode_frame(FrameKind::Request, &request.encode()).expect("requests fit a frame")
}

/// A QUIC client configuration trusting the PEM certificate at `cert`, with
/// the service's transport settings.
pub fn client_config(cert: &Path) -> quinn::ClientConfig {
    shuffle_client::quic_client_config(&shuffle_client::ClientOptions::new("raw").trusted_cert(cert))
        .expect("client config for the test certificate")
}

impl RawConnection {
    /// Connects and sends `Hello` creating `app`; returns the server's answer to it too.
    pub async fn connect(addr: SocketAddr, cert: &Path, app: &str, token: Option<&str>) -> (Self, Reply) {
        Self::connect_as(addr, cert, app, None, token).await
    }

    /// Connects and sends `Hello` for `app` with `secret` (joining it; `None` creates it).
    pub async fn connect_as(
        addr: SocketAddr,
        cert: &Path,
        app: &str,
        secret: Option<AppSecret>,
        token: Option<&str>,
    ) -> (Self, Reply) {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("endpoint");
        endpoint.set_default_client_config(client_config(cert));
        let connection = endpoint.connect(addr, "localhost").expect("connect").await.expect("handshake");
        let raw = Self { endpoint, connection };
        let hello = Request::Hello {
            protocol_version: PROTOCOL_VERSION,
            app: AppId::new(app).expect("app id"),
            secret,
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
        let mut decoder = FrameDecoder::default();
        let mut reply = Reply { responses: Vec::new(), blocks: 0 };
        let read = async {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match recv.read(&mut buf).await {
                    Ok(Some(n)) => n,
                    Ok(None) | Err(_) => break,
                };
                let Ok(frames) = decoder.feed(&buf[..n]) else { break };
                for Frame { kind, payload } in frames {
                    match kind {
                        FrameKind::Response => reply.responses.push(Response::decode(&payload).expect("response")),
                        FrameKind::Block => reply.blocks += 1,
                        FrameKind::Request => panic!("server sent a request frame"),
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), read).await.expect("server reply within 20 s");
        reply
    }
}
