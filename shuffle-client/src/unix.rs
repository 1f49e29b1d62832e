//! The same-host transport: the server's Unix domain socket.
//!
//! On one host the network stack is pure overhead (DESIGN.md, "Transport").
//! A [`UnixLink`] opens one socket per request stream; each begins with a
//! `Hello` carrying the app's credentials, exactly as a QUIC connection's
//! first stream does, so the same credentials apply. One more socket, the
//! anchor, stays open for the link's life: it keeps the app alive on the
//! server, and when the client process dies the kernel closes it at once.

use std::{
    collections::VecDeque,
    io::IoSliceMut,
    mem::MaybeUninit,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Mutex,
    task::{Context, Poll},
};

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

use bytes::Bytes;
use shuffle_protocol::{AppId, AppSecret, PROTOCOL_VERSION, Request, Response};
use tokio::{
    io::{AsyncRead, AsyncWriteExt, Interest, ReadBuf},
    net::{
        UnixStream,
        unix::{OwnedReadHalf, OwnedWriteHalf},
    },
};

use crate::{
    ClientError, ClientOptions,
    transport::{FrameReader, SendError, StreamRecv, request_frame},
};

/// A way to the server through its Unix socket.
pub(crate) struct UnixLink {
    path: PathBuf,
    /// What every stream says first.
    hello: Request,
    /// Send buffer to ask for on every stream (0: the kernel's default).
    send_buffer: usize,
    /// Kept open while the link lives; dropped by `close`.
    anchor: Mutex<Option<UnixStream>>,
}

/// What a `Hello` on the socket answered.
pub(crate) struct Welcome {
    pub secret: AppSecret,
    pub server_id: String,
}

impl UnixLink {
    /// Connects to the socket at `path`, says `Hello` for `app` (creating it
    /// when `secret` is `None`) with the token and socket settings of
    /// `options`, and keeps that socket as the anchor.
    pub async fn connect(
        path: &Path,
        app: &AppId,
        secret: Option<AppSecret>,
        options: &ClientOptions,
    ) -> Result<(Self, Welcome), ClientError> {
        let hello = |secret| Request::Hello {
            protocol_version: PROTOCOL_VERSION,
            app: app.clone(),
            secret,
            auth_token: options.auth_token.clone(),
        };
        let send_buffer = options.unix_send_buffer;
        let (stream, welcome) = say_hello(path, &hello(secret), send_buffer).await?;
        let link = Self {
            path: path.to_path_buf(),
            hello: hello(Some(welcome.secret.clone())),
            send_buffer,
            anchor: Mutex::new(Some(stream)),
        };
        Ok((link, welcome))
    }

    /// Opens a request stream: a new socket that has said `Hello`.
    pub async fn open(&self) -> Result<(UnixSend, UnixRecv), ClientError> {
        if self.anchor.lock().map_or(true, |a| a.is_none()) {
            return Err(ClientError::ConnectionLost("the client was closed".into()));
        }
        let (stream, _) = say_hello(&self.path, &self.hello, self.send_buffer).await?;
        let (read, write) = stream.into_split();
        Ok((UnixSend { half: Some(write) }, UnixRecv::new(read)))
    }

    /// Closes the anchor; streams already open go on.
    pub fn close(&self) {
        if let Ok(mut anchor) = self.anchor.lock() {
            anchor.take();
        }
    }
}

/// Asks the kernel for `bytes` of send buffer on `stream` (0: leaves the default).
fn ask_send_buffer(stream: &UnixStream, bytes: usize) -> rustix::io::Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    rustix::net::sockopt::set_socket_send_buffer_size(stream, bytes)
}

/// Connects, asks for `send_buffer` bytes of send buffer (unless 0), and
/// exchanges `Hello` for `Welcome`.
async fn say_hello(path: &Path, hello: &Request, send_buffer: usize) -> Result<(UnixStream, Welcome), ClientError> {
    let connect_err = |reason: String| ClientError::ConnectUnix { path: path.to_path_buf(), reason };
    let mut stream = UnixStream::connect(path).await.map_err(|e| connect_err(e.to_string()))?;
    if let Err(e) = ask_send_buffer(&stream, send_buffer) {
        // Only a performance setting: the stream works with the kernel's default.
        tracing::debug!(socket = %path.display(), error = %e, "cannot set the send buffer");
    }
    stream.write_all(&request_frame(hello)?).await.map_err(|e| connect_err(e.to_string()))?;
    let (read, write) = stream.into_split();
    let mut reader = FrameReader::new(StreamRecv::Unix(UnixRecv::new(read)));
    let welcome = match reader.response().await? {
        Response::Welcome { app_secret, server_id, .. } => Welcome { secret: app_secret, server_id },
        other => return Err(ClientError::Protocol(format!("expected Welcome, got {other:?}"))),
    };
    let StreamRecv::Unix(UnixRecv { half: read, .. }) = reader.into_stream() else { unreachable!("built above") };
    let stream = read.reunite(write).map_err(|e| connect_err(e.to_string()))?;
    Ok((stream, welcome))
}

/// The sending half of a request stream on the socket.
pub(crate) struct UnixSend {
    half: Option<OwnedWriteHalf>,
}

impl UnixSend {
    /// Writes `chunks` with vectored writes.
    pub async fn write_chunks(&mut self, chunks: &mut [Bytes]) -> Result<(), SendError> {
        let Some(half) = &mut self.half else {
            return Err(SendError::Lost(ClientError::ConnectionLost("the stream was finished".into())));
        };
        let mut index = 0;
        let mut offset = 0;
        while index < chunks.len() {
            let slices: Vec<std::io::IoSlice<'_>> = std::iter::once(&chunks[index][offset..])
                .chain(chunks[index + 1..].iter().map(|c| &c[..]))
                .take(64)
                .map(std::io::IoSlice::new)
                .collect();
            let mut n = match half.write_vectored(&slices).await {
                Ok(0) => return Err(SendError::Stopped),
                Ok(n) => n,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset) => {
                    return Err(SendError::Stopped);
                }
                Err(e) => return Err(SendError::Lost(ClientError::ConnectionLost(e.to_string()))),
            };
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

    /// Ends the stream after what was written (the server sees end of file).
    pub fn finish(&mut self) {
        if let Some(half) = &self.half {
            let _ = rustix::net::shutdown(half.as_ref(), rustix::net::Shutdown::Write);
        }
    }

    /// Abandons the stream: the socket closes without the request's end, so
    /// the server discards what it carried.
    pub fn reset(&mut self) {
        if let Some(half) = self.half.take() {
            let _ = rustix::net::shutdown(half.as_ref(), rustix::net::Shutdown::Both);
        }
    }
}

/// The receiving half of a request stream on the socket.
pub(crate) struct UnixRecv {
    half: OwnedReadHalf,
    /// Whether to read with `recvmsg`, keeping file descriptors passed beside the bytes.
    receives_files: bool,
    /// Descriptors received, in the order they came.
    fds: VecDeque<OwnedFd>,
}

/// Descriptors one `recvmsg` keeps at most: the server passes one per message.
const FDS_PER_READ: usize = 4;

impl UnixRecv {
    fn new(half: OwnedReadHalf) -> Self {
        Self { half, receives_files: false, fds: VecDeque::new() }
    }

    /// Reads with `recvmsg` from now on, keeping descriptors passed beside the bytes.
    pub fn receive_files(&mut self) {
        self.receives_files = true;
    }

    /// The oldest descriptor received and not yet taken.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }
}

impl AsyncRead for UnixRecv {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.receives_files {
            return Pin::new(&mut this.half).poll_read(cx, buf);
        }
        let stream: &UnixStream = this.half.as_ref();
        loop {
            std::task::ready!(stream.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_READ))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let received = stream.try_io(Interest::READABLE, || {
                rustix::net::recvmsg(stream, &mut [IoSliceMut::new(unfilled)], &mut control, RecvFlags::CMSG_CLOEXEC)
                    .map_err(std::io::Error::from)
            });
            match received {
                Ok(message) => {
                    for item in control.drain() {
                        if let RecvAncillaryMessage::ScmRights(fds) = item {
                            this.fds.extend(fds);
                        }
                    }
                    buf.advance(message.bytes);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_buffer(stream: &UnixStream) -> usize {
        rustix::net::sockopt::socket_send_buffer_size(stream).expect("SO_SNDBUF")
    }

    #[tokio::test]
    async fn a_stream_gets_the_send_buffer_asked_for_up_to_the_kernels_cap() {
        let (default, _peer) = UnixStream::pair().unwrap();
        let kernel_default = send_buffer(&default);
        ask_send_buffer(&default, 0).unwrap();
        assert_eq!(send_buffer(&default), kernel_default, "0 keeps the kernel's default");

        let (tuned, _peer) = UnixStream::pair().unwrap();
        let asked = crate::options::DEFAULT_UNIX_SEND_BUFFER;
        ask_send_buffer(&tuned, asked).unwrap();
        // Linux doubles what it grants (for its own bookkeeping) and caps the request at wmem_max.
        let cap: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max").unwrap().trim().parse().unwrap();
        let got = send_buffer(&tuned);
        assert!(got >= asked.min(cap), "asked {asked}, cap {cap}, got {got}");
        if cap >= asked {
            assert!(got > kernel_default, "asked {asked} over the default {kernel_default}, got {got}");
        }
    }
}
