//! One client connection: the `Hello` that binds it to an app (and checks its
//! token), then one task per request stream. A failing request gets an error
//! response on its own stream; the connection and every other stream go on.

use std::{sync::Arc, time::Duration};

use shuffle_protocol::{ErrorKind, PROTOCOL_VERSION, Request, Response, ServiceError};

use crate::{
    push::{handle_push, request_name},
    read::handle_read,
    shutdown::{InFlight, Shutdown},
    state::{AppSession, ServiceState},
    stats::ServerStats,
    telemetry,
    transport::{FrameReader, FrameWriter},
};

/// How long a new connection has to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// QUIC application error code for closing a connection that failed its `Hello`.
pub const CLOSE_HELLO_FAILED: u32 = 1;
/// QUIC application error code for closing connections at shutdown.
pub const CLOSE_SHUTDOWN: u32 = 2;

/// Serves one connection until it closes.
pub async fn serve_connection(
    state: Arc<ServiceState>,
    connection: quinn::Connection,
    shutdown: Shutdown,
    in_flight: InFlight,
) {
    let remote = connection.remote_address();
    let session = match hello(&state, &connection).await {
        Ok(session) => Arc::new(session),
        Err(e) => {
            tracing::info!(%remote, error = %e, "connection refused");
            connection.close(CLOSE_HELLO_FAILED.into(), e.message.as_bytes());
            return;
        }
    };
    tracing::debug!(%remote, app = %session.app, "connection open");
    loop {
        let (send, recv) = match connection.accept_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                tracing::debug!(%remote, app = %session.app, reason = %e, "connection closed");
                return;
            }
        };
        let guard = in_flight.enter();
        let (state, session, shutdown) = (state.clone(), session.clone(), shutdown.clone());
        tokio::spawn(async move {
            serve_stream(&state, &session, FrameReader::new(recv), FrameWriter::new(send), &shutdown).await;
            drop(guard);
        });
    }
}

/// Reads the first stream's `Hello`, answers it, and binds the connection to its app.
async fn hello(state: &Arc<ServiceState>, connection: &quinn::Connection) -> Result<AppSession, ServiceError> {
    let timed_out = |_| ServiceError::new(ErrorKind::UnexpectedMessage, "no Hello within 10 s of connecting");
    let (send, recv) = tokio::time::timeout(HELLO_TIMEOUT, connection.accept_bi())
        .await
        .map_err(timed_out)?
        .map_err(|e| ServiceError::new(ErrorKind::Io, format!("connection lost before Hello: {e}")))?;
    let (mut reader, mut writer) = (FrameReader::new(recv), FrameWriter::new(send));
    let result = match tokio::time::timeout(HELLO_TIMEOUT, reader.next_request()).await.map_err(timed_out) {
        Ok(Ok(Some(Request::Hello { protocol_version, app, auth_token }))) => {
            check_hello(state, protocol_version, auth_token.as_deref()).and_then(|_| {
                app.validate().map_err(ServiceError::from)?;
                Ok(app)
            })
        }
        Ok(Ok(Some(other))) => Err(ServiceError::new(
            ErrorKind::UnexpectedMessage,
            format!("the first request of a connection must be Hello, not {}", request_name(&other)),
        )),
        Ok(Ok(None)) => Err(ServiceError::new(ErrorKind::UnexpectedMessage, "stream closed before Hello")),
        Ok(Err(e)) | Err(e) => Err(e),
    };
    match result {
        Ok(app) => {
            let welcome = Response::Welcome { server_version: env!("CARGO_PKG_VERSION").to_string() };
            writer
                .response(&welcome)
                .await
                .map_err(|e| ServiceError::new(ErrorKind::Io, format!("answering Hello: {e}")))?;
            writer.finish();
            Ok(state.open_session(app))
        }
        Err(e) => {
            ServerStats::add(&state.stats.errors, 1);
            let _ = writer.response(&Response::Error(e.clone())).await;
            writer.finish_and_flush().await;
            Err(e)
        }
    }
}

fn check_hello(state: &ServiceState, protocol_version: u16, token: Option<&str>) -> Result<(), ServiceError> {
    if protocol_version != PROTOCOL_VERSION {
        return Err(ServiceError::new(
            ErrorKind::ProtocolVersion,
            format!("client speaks protocol version {protocol_version}, this server speaks {PROTOCOL_VERSION}"),
        ));
    }
    if let Some(expected) = &state.config.auth_token
        && !token.is_some_and(|t| constant_time_eq(t.as_bytes(), expected.as_bytes()))
    {
        let what = if token.is_some() { "presented a wrong auth token" } else { "presented no auth token" };
        return Err(ServiceError::new(
            ErrorKind::Unauthenticated,
            format!("authentication failed: the connection {what}"),
        ));
    }
    Ok(())
}

/// Compares secrets without an early exit, so timing does not reveal a prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves one request stream; errors go back to the client on the same stream.
async fn serve_stream(
    state: &Arc<ServiceState>,
    session: &AppSession,
    mut reader: FrameReader<quinn::RecvStream>,
    mut writer: FrameWriter<quinn::SendStream>,
    shutdown: &Shutdown,
) {
    let started = std::time::Instant::now();
    let mut name = "unknown";
    let result = async {
        let Some(request) = reader.next_request().await? else {
            return Ok(());
        };
        name = request_name(&request);
        if shutdown.is_triggered() {
            return Err(ServiceError::new(ErrorKind::ShuttingDown, "the server is shutting down"));
        }
        match request {
            Request::RegisterShuffle { shuffle, spec } => {
                state.register_shuffle(session, shuffle, spec)?;
                respond_ok(&mut writer).await
            }
            Request::UnregisterShuffle { shuffle } => {
                state.unregister_shuffle(session, shuffle).await?;
                respond_ok(&mut writer).await
            }
            Request::UnregisterApp => {
                state.unregister_app(session).await?;
                respond_ok(&mut writer).await
            }
            Request::OpenPush { shuffle, map, attempt } => {
                handle_push(state, session, (shuffle, map, attempt), &mut reader, &mut writer).await
            }
            Request::OpenPartition { shuffle, partition } => {
                handle_read(state, session, (shuffle, partition), &mut writer, shutdown).await
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

async fn respond_ok(writer: &mut FrameWriter<quinn::SendStream>) -> Result<(), ServiceError> {
    writer
        .response(&Response::Ok)
        .await
        .map_err(|e| ServiceError::new(ErrorKind::Io, format!("writing to the stream: {e}")))
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison_needs_equal_bytes() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
