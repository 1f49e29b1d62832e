//! One client connection: the `Hello` that binds it to an app (checking the
//! admission token and the app's secret), then one task per request
//! stream. A failing request gets an error response on its own stream; the
//! connection and every other stream go on.
//!
//! Everything here is generic over the streams' types: a QUIC connection
//! carries many request streams after one `Hello`; a Unix-socket stream
//! carries one `Hello` and then one request.

use std::{sync::Arc, time::Duration};

use shuffle_protocol::{ErrorKind, MAX_FRAME_LEN, PROTOCOL_VERSION, Request, Response, ServiceError};
use tokio::io::AsyncRead;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth,
    push::{handle_push, request_name},
    read::{handle_read, handle_read_by_key},
    state::{AppSession, ServiceState},
    stats::ServerStats,
    telemetry,
    transport::{self, FrameReader, FrameSink, FrameWriter, StreamSink, Windows},
};

/// How long a new connection has to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// QUIC application error code for closing a connection that failed its `Hello`.
pub const CLOSE_HELLO_FAILED: u32 = 1;
/// QUIC application error code for closing connections at shutdown.
pub const CLOSE_SHUTDOWN: u32 = 2;

/// What every connection task shares.
#[derive(Clone)]
pub struct ServerContext {
    /// The service's state.
    pub state: Arc<ServiceState>,
    /// Cancelled when the server starts shutting down.
    pub shutdown: CancellationToken,
    /// Tracks requests in flight, so shutdown can let them finish.
    pub requests: TaskTracker,
    /// The QUIC windows derived from the budget.
    pub windows: Windows,
    /// Authenticated QUIC connections now.
    pub authenticated: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts an authenticated connection while it lives.
struct Authenticated(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Authenticated {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// What a connection's first request bound it to.
pub enum Binding {
    /// A client of an app.
    App(AppSession),
    /// Another worker of the cluster (by id), forwarding blocks to this one.
    Peer(String),
}

/// Serves one QUIC connection until it closes.
pub async fn serve_quic_connection(ctx: ServerContext, connection: quinn::Connection) {
    let remote = connection.remote_address();
    let state = &ctx.state;
    let first = tokio::time::timeout(HELLO_TIMEOUT, connection.accept_bi()).await;
    let session = match first {
        Ok(Ok((send, recv))) => {
            let mut reader = FrameReader::for_hello(recv, &state.receive_buffers);
            let mut writer = FrameWriter::new(send);
            let admit = || {
                let counted = ctx.authenticated.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                let guard = Authenticated(ctx.authenticated.clone());
                if counted >= ctx.windows.max_connections {
                    return Err(ServiceError::new(
                        ErrorKind::Busy,
                        format!(
                            "the server serves at most {} authenticated connections with its memory budget; retry later",
                            ctx.windows.max_connections
                        ),
                    ));
                }
                Ok(guard)
            };
            let session = hello(state, &mut reader, &mut writer, admit).await;
            if session.is_ok() {
                writer.finish();
            }
            session
        }
        Ok(Err(e)) => Err(ServiceError::new(ErrorKind::Io, format!("connection lost before Hello: {e}"))),
        Err(_) => Err(ServiceError::new(ErrorKind::UnexpectedMessage, "no Hello within 10 s of connecting")),
    };
    let (session, _authenticated) = match session {
        Ok((Binding::App(session), counted)) => (Arc::new(session), counted),
        Ok((Binding::Peer(peer), counted)) => {
            transport::authenticated(&connection, ctx.windows, state.config.max_streams_per_connection);
            serve_peer_connection(&ctx, connection, &peer).await;
            drop(counted);
            return;
        }
        Err(e) => {
            tracing::info!(%remote, error = %e, "connection refused");
            connection.close(CLOSE_HELLO_FAILED.into(), e.message.as_bytes());
            return;
        }
    };
    transport::authenticated(&connection, ctx.windows, state.config.max_streams_per_connection);
    tracing::debug!(%remote, app = %session.app, "connection open");
    loop {
        let (send, recv) = tokio::select! {
            streams = connection.accept_bi() => match streams {
                Ok(streams) => streams,
                Err(e) => {
                    tracing::debug!(%remote, app = %session.app, reason = %e, "connection closed");
                    return;
                }
            },
            _ = ctx.shutdown.cancelled() => {
                // In-flight requests go on; new streams are refused below until the connection closes.
                connection.set_max_concurrent_bi_streams(0u8.into());
                let _ = connection.closed().await;
                return;
            }
        };
        let (ctx, session) = (ctx.clone(), session.clone());
        ctx.requests.clone().spawn(async move {
            // Partly received frames count against the app's own share of memory.
            let reader = FrameReader::new(recv, &session.receive_buffers, MAX_FRAME_LEN);
            serve_stream(&ctx, &session, reader, FrameWriter::new(send), false).await;
        });
    }
}

/// Serves one Unix-socket stream: a `Hello`, then one request.
pub async fn serve_unix_stream(ctx: ServerContext, stream: tokio::net::UnixStream) {
    let (read, write) = stream.into_split();
    let mut reader = FrameReader::for_hello(read, &ctx.state.receive_buffers);
    let mut writer = FrameWriter::new(StreamSink(write));
    let session = match hello(&ctx.state, &mut reader, &mut writer, || Ok(())).await {
        Ok((Binding::App(session), ())) => session,
        Ok((Binding::Peer(peer), ())) => {
            // A worker on this host forwarding one attempt's blocks.
            reader.after_hello(&ctx.state.receive_buffers, MAX_FRAME_LEN);
            serve_peer_stream(&ctx, &peer, reader, writer).await;
            return;
        }
        Err(e) => {
            tracing::info!(error = %e, "Unix socket stream refused");
            return;
        }
    };
    reader.after_hello(&session.receive_buffers, MAX_FRAME_LEN);
    serve_stream(&ctx, &session, reader, writer, true).await;
}

/// Reads a `Hello`, answers it, and binds the connection to its app;
/// `admit` decides, once the credentials are good, whether there is room
/// for the connection (its result lives as long as the connection).
pub async fn hello<R, W, T>(
    state: &Arc<ServiceState>,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    admit: impl FnOnce() -> Result<T, ServiceError>,
) -> Result<(Binding, T), ServiceError>
where
    R: AsyncRead + Unpin + Send,
    W: FrameSink,
{
    let timed_out = |_| ServiceError::new(ErrorKind::UnexpectedMessage, "no Hello within 10 s of connecting");
    let result = match tokio::time::timeout(HELLO_TIMEOUT, reader.next_request()).await.map_err(timed_out) {
        Ok(Ok(Some(Request::Hello { protocol_version, app, secret, auth_token }))) => check_version(protocol_version)
            .and_then(|()| auth::check_token(state.config.auth_token.as_deref(), auth_token.as_deref()))
            .and_then(|()| app.validate().map_err(ServiceError::from))
            .and_then(|()| state.open_session(app, secret.as_ref()))
            .and_then(|session| Ok((Binding::App(session), admit()?))),
        Ok(Ok(Some(Request::PeerHello { protocol_version, cluster_secret, worker }))) if state.is_worker() => {
            check_version(protocol_version)
                .and_then(|()| crate::cluster::worker::check_peer(state, &cluster_secret))
                .and_then(|()| Ok((Binding::Peer(worker), admit()?)))
        }
        Ok(Ok(Some(other))) => Err(ServiceError::new(
            ErrorKind::UnexpectedMessage,
            format!("the first request of a connection must be Hello, not {}", request_name(&other)),
        )),
        Ok(Ok(None)) => Err(ServiceError::new(ErrorKind::UnexpectedMessage, "stream closed before Hello")),
        Ok(Err(e)) | Err(e) => Err(e),
    };
    let unix_socket = || crate::storage::lock(&state.unix_socket).as_ref().map(|p| p.display().to_string());
    match result {
        Ok((Binding::App(session), admitted)) => {
            let welcome = Response::Welcome {
                server_version: env!("CARGO_PKG_VERSION").to_string(),
                app_secret: session.secret.clone(),
                server_id: state.server_id.clone(),
                unix_socket: unix_socket(),
                role: state.config.role.protocol(),
            };
            writer.response(&welcome).await?;
            Ok((Binding::App(session), admitted))
        }
        Ok((Binding::Peer(peer), admitted)) => {
            let welcome = Response::PeerWelcome { worker: state.worker_id.clone(), unix_socket: unix_socket() };
            writer.response(&welcome).await?;
            Ok((Binding::Peer(peer), admitted))
        }
        Err(e) => {
            ServerStats::add(&state.stats.errors, 1);
            telemetry::record_error(e.kind);
            let _ = writer.response(&Response::Error(e.clone())).await;
            writer.finish_and_flush().await;
            Err(e)
        }
    }
}

fn no_files() -> ServiceError {
    ServiceError::new(
        ErrorKind::UnexpectedMessage,
        "direct reads pass open files, which only the server's Unix socket can carry",
    )
}

/// One request of a client at a cluster's worker.
async fn serve_worker_request<R, W>(
    ctx: &ServerContext,
    session: &AppSession,
    request: Request,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    can_pass_files: bool,
) -> Result<(), ServiceError>
where
    R: AsyncRead + Unpin + Send,
    W: FrameSink,
{
    use crate::cluster::{
        push::PushKind,
        read::{handle_read as read_copy, handle_read_by_key as read_copy_by_key},
    };
    let state = &ctx.state;
    let peers = state.peers.get();
    match request {
        Request::OpenPush { shuffle, map, attempt } | Request::OpenFailoverPush { shuffle, map, attempt } => {
            let kind = if matches!(request, Request::OpenPush { .. }) { PushKind::Primary } else { PushKind::Failover };
            let hosted = state.hosted(session, shuffle)?;
            crate::cluster::push::handle_push(state, peers, hosted, (map, attempt), kind, reader, writer).await
        }
        Request::OpenPartition { shuffle, partition } => {
            let hosted = state.hosted(session, shuffle)?;
            read_copy(state, hosted, partition, writer, &ctx.shutdown, false, &[]).await
        }
        Request::OpenPartitionDirect { shuffle, partition } if can_pass_files => {
            let hosted = state.hosted(session, shuffle)?;
            read_copy(state, hosted, partition, writer, &ctx.shutdown, true, &[]).await
        }
        Request::OpenPartitionFrom { shuffle, partition, direct, resume } if can_pass_files || !direct => {
            let hosted = state.hosted(session, shuffle)?;
            read_copy(state, hosted, partition, writer, &ctx.shutdown, direct, &resume).await
        }
        Request::OpenPartitionByKey { shuffle, partition, direct } if can_pass_files || !direct => {
            let hosted = state.hosted(session, shuffle)?;
            read_copy_by_key(state, hosted, partition, (reader, writer), &ctx.shutdown, direct).await
        }
        Request::OpenPartitionDirect { .. }
        | Request::OpenPartitionFrom { .. }
        | Request::OpenPartitionByKey { .. } => Err(no_files()),
        other => Err(ServiceError::new(
            ErrorKind::WrongRole,
            format!(
                "{} goes to the cluster's coordinator: a worker serves pushes and reads of the shuffles placed on it",
                request_name(&other)
            ),
        )),
    }
}

/// Serves a connection from another worker: forwarded pushes.
async fn serve_peer_connection(ctx: &ServerContext, connection: quinn::Connection, peer: &str) {
    loop {
        let (send, recv) = tokio::select! {
            streams = connection.accept_bi() => match streams {
                Ok(streams) => streams,
                Err(_) => return,
            },
            _ = ctx.shutdown.cancelled() => return,
        };
        let ctx = ctx.clone();
        let peer = peer.to_string();
        ctx.requests.clone().spawn(async move {
            let reader = FrameReader::new(recv, &ctx.state.receive_buffers, MAX_FRAME_LEN);
            serve_peer_stream(&ctx, &peer, reader, FrameWriter::new(send)).await;
        });
    }
}

/// Serves one stream of another worker (on its QUIC connection, or on this
/// worker's Unix socket when they share a host): a forwarded push.
async fn serve_peer_stream<R, W>(
    ctx: &ServerContext,
    peer: &str,
    mut reader: FrameReader<R>,
    mut writer: FrameWriter<W>,
) where
    R: AsyncRead + Unpin + Send,
    W: FrameSink,
{
    let state = &ctx.state;
    let result = async {
        match reader.next_request().await? {
            Some(Request::ReplicaPush { app, shuffle, map, attempt }) => {
                let hosted = state.hosted_by_app(&app, shuffle)?;
                crate::cluster::push::handle_push(
                    state,
                    state.peers.get(),
                    hosted,
                    (map, attempt),
                    crate::cluster::push::PushKind::Replica,
                    &mut reader,
                    &mut writer,
                )
                .await
            }
            Some(other) => Err(ServiceError::new(
                ErrorKind::UnexpectedMessage,
                format!("a peer may forward pushes, not send {}", request_name(&other)),
            )),
            None => Ok(()),
        }
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "forwarded push failed");
        ServerStats::add(&state.stats.errors, 1);
        let _ = writer.response(&Response::Error(e)).await;
    }
    writer.finish();
}

fn check_version(protocol_version: u16) -> Result<(), ServiceError> {
    if protocol_version != PROTOCOL_VERSION {
        return Err(ServiceError::new(
            ErrorKind::ProtocolVersion,
            format!("client speaks protocol version {protocol_version}, this server speaks {PROTOCOL_VERSION}"),
        ));
    }
    Ok(())
}

/// Serves one request stream; errors go back to the client on the same
/// stream. `can_pass_files`: the stream is a Unix socket (direct reads).
pub async fn serve_stream<R, W>(
    ctx: &ServerContext,
    session: &AppSession,
    mut reader: FrameReader<R>,
    mut writer: FrameWriter<W>,
    can_pass_files: bool,
) where
    R: AsyncRead + Unpin + Send,
    W: FrameSink,
{
    let state = &ctx.state;
    let started = std::time::Instant::now();
    let mut name = "unknown";
    let result = async {
        // An idle stream (a same-host client's anchor) must not hold up shutdown.
        let request = tokio::select! {
            request = reader.next_request() => request?,
            _ = ctx.shutdown.cancelled() => return Ok(()),
        };
        let Some(request) = request else {
            return Ok(());
        };
        name = request_name(&request);
        if ctx.shutdown.is_cancelled() {
            return Err(ServiceError::new(ErrorKind::ShuttingDown, "the server is shutting down"));
        }
        if state.is_worker() {
            return serve_worker_request(ctx, session, request, &mut reader, &mut writer, can_pass_files).await;
        }
        match request {
            Request::RegisterShuffle { shuffle, spec } if spec.replication > 1 => Err(ServiceError::new(
                ErrorKind::InvalidSpec,
                format!(
                    "shuffle {shuffle} asks for {} copies of every block; a standalone server holds one \
                     (replication needs a cluster)",
                    spec.replication
                ),
            )),
            Request::RegisterShuffle { shuffle, spec } => {
                state.register_shuffle(session, shuffle, spec)?;
                writer.response(&Response::Ok).await
            }
            Request::UnregisterShuffle { shuffle } => {
                state.unregister_shuffle(session, shuffle).await?;
                writer.response(&Response::Ok).await
            }
            Request::UnregisterApp => {
                state.unregister_app(session).await?;
                writer.response(&Response::Ok).await
            }
            Request::OpenPush { shuffle, map, attempt } => {
                handle_push(state, session, (shuffle, map, attempt), &mut reader, &mut writer).await
            }
            Request::OpenPartition { shuffle, partition } => {
                handle_read(state, session, (shuffle, partition), &mut writer, &ctx.shutdown, false).await
            }
            Request::OpenPartitionDirect { shuffle, partition } if can_pass_files => {
                handle_read(state, session, (shuffle, partition), &mut writer, &ctx.shutdown, true).await
            }
            Request::OpenPartitionByKey { shuffle, partition, direct } if can_pass_files || !direct => {
                let streams = (&mut reader, &mut writer);
                handle_read_by_key(state, session, (shuffle, partition), streams, &ctx.shutdown, direct).await
            }
            Request::OpenPartitionDirect { .. } | Request::OpenPartitionByKey { .. } => Err(no_files()),
            Request::OpenPartitionFrom { shuffle, partition, direct, resume } => {
                if direct && !can_pass_files {
                    return Err(no_files());
                }
                let shuffle = state.shuffle(session, shuffle)?;
                crate::read::serve_partition(state, &shuffle, partition, &mut writer, &ctx.shutdown, direct, &resume)
                    .await
            }
            other => Err(ServiceError::new(
                ErrorKind::UnexpectedMessage,
                format!("{} cannot open a stream", request_name(&other)),
            )),
        }
    }
    .await;
    telemetry::record_request(name, started.elapsed());
    if let Err(e) = result {
        ServerStats::add(&state.stats.errors, 1);
        telemetry::record_error(e.kind);
        tracing::debug!(app = %session.app, error = %e, "request failed");
        let _ = writer.response(&Response::Error(e)).await;
    }
    writer.finish();
}
