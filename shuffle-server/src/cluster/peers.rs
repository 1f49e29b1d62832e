//! QUIC connections a cluster process opens to another: a worker to its
//! coordinator, a primary to its replicas. Every cluster process presents
//! and trusts the same certificate (`--cert`), and proves it belongs to the
//! cluster with the shared cluster secret (`PeerHello`, `RegisterWorker`).
//!
//! [`Forward`] is one map attempt's blocks of one group on their way from
//! the primary to the replica: blocks out, cumulative `Acked` counts and
//! the replica's `Prepared` back. A replica on the primary's own host is
//! reached on its Unix socket, as same-host clients reach a worker: its
//! `PeerWelcome` names the socket, and a stream there says `PeerHello`
//! first and goes on only if the worker answering is that replica.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use rustls::pki_types::{CertificateDer, pem::PemObject};
use shuffle_protocol::{
    AppId, AttemptId, ErrorKind, MAX_FRAME_LEN, MapEnd, MapId, PROTOCOL_VERSION, Request, Response, ServiceError,
    ShuffleId,
};
use tokio::sync::{oneshot, watch};

use crate::{
    ServerConfig, ServerError,
    fault::{Partition, UnixCut, udp_socket},
    memory::Consumer,
    tls::ALPN,
    transport::{FrameReader, FrameSink, FrameWriter, StreamSink, apply_mtu},
};

/// How long a connection attempt to a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a peer has to answer a control request.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams the other side may open on a connection this process opened
/// (the coordinator sends its commands to a worker on the worker's own
/// connection).
const INCOMING_STREAMS: u32 = 64;

/// The QUIC client configuration of cluster processes: TLS 1.3 trusting the
/// cluster's certificate, idle time-out of the worker time-out so a dead
/// peer is noticed, keep-alives well inside it.
pub fn client_config(config: &ServerConfig) -> Result<quinn::ClientConfig, ServerError> {
    let path = config.cert.as_ref().ok_or_else(|| ServerError::Config("cluster processes need --cert".into()))?;
    let bad = |e: &dyn std::fmt::Display| ServerError::Tls(format!("{}: {e}", path.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| ServerError::Tls(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    let idle = config.worker_timeout.max(Duration::from_secs(1));
    t.max_concurrent_bidi_streams(INCOMING_STREAMS.into())
        .max_concurrent_uni_streams(0u8.into())
        .keep_alive_interval(Some(config.heartbeat_interval.min(idle / 3)))
        .max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    apply_mtu(&mut t, config.max_udp_payload);
    client.transport_config(Arc::new(t));
    Ok(client)
}

fn peer_error(addr: SocketAddr, what: impl std::fmt::Display) -> ServiceError {
    ServiceError::new(ErrorKind::Io, format!("cluster peer {addr}: {what}"))
}

/// The connections this process keeps to other cluster processes.
pub struct Peers {
    endpoint: quinn::Endpoint,
    tls_name: String,
    secret: String,
    /// This process's id (a worker's id; "coordinator" otherwise).
    me: String,
    /// Peer connections with their `PeerHello` done, by address. Each
    /// address has its own lock, held while connecting: connecting to a
    /// peer that is gone (which waits out the connect time-out) holds up no
    /// forwarding to the others.
    connections: std::sync::Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Option<PeerLink>>>>>,
    /// Accounts the buffers of frames read from peers.
    buffers: Arc<Consumer>,
    /// Forwarding streams opened on replicas' Unix sockets.
    pub forwards_unix: AtomicU64,
    /// Forwarding streams opened over QUIC.
    pub forwards_quic: AtomicU64,
    /// Replicas left behind (forwarding to them failed) that answered a probe again.
    pub replicas_back: AtomicU64,
    /// With `--fault-injection`, the partition that cuts this worker's Unix streams.
    partition: Option<Arc<Partition>>,
}

/// A connection to a peer and what its `PeerWelcome` said.
#[derive(Clone)]
struct PeerLink {
    connection: quinn::Connection,
    /// The peer's worker id.
    worker: String,
    /// The peer's Unix socket, if it has one and the path exists here.
    unix: Option<PathBuf>,
}

impl Peers {
    /// A client endpoint for talking to the cluster.
    pub fn new(
        config: &ServerConfig,
        me: String,
        buffers: Arc<Consumer>,
        partition: Arc<Partition>,
    ) -> Result<Self, ServerError> {
        let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
        let bind_err = |source| ServerError::Bind { addr: bind, source };
        let partition = config.fault_injection.then_some(partition);
        let socket = udp_socket(bind, partition.as_ref()).map_err(bind_err)?;
        let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_err)?;
        endpoint.set_default_client_config(client_config(config)?);
        let secret = config.cluster_secret.clone().unwrap_or_default();
        Ok(Self {
            endpoint,
            tls_name: config.tls_name.clone(),
            secret,
            me,
            connections: std::sync::Mutex::new(HashMap::new()),
            buffers,
            forwards_unix: AtomicU64::new(0),
            replicas_back: AtomicU64::new(0),
            forwards_quic: AtomicU64::new(0),
            partition,
        })
    }

    /// The cluster secret, to present.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The frame-buffer account of peer streams.
    pub fn buffers(&self) -> &Arc<Consumer> {
        &self.buffers
    }

    /// A new connection to `addr` (TLS handshake only).
    pub async fn connect(&self, addr: SocketAddr) -> Result<quinn::Connection, ServiceError> {
        let connecting = self.endpoint.connect(addr, &self.tls_name).map_err(|e| peer_error(addr, e))?;
        tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| peer_error(addr, format!("no handshake within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| peer_error(addr, e))
    }

    /// Whether the worker `worker` at `addr` answers now: a new connection
    /// (not the one kept for forwarding, which may be stale) and a
    /// `PeerHello` round trip, each within its time-out.
    pub async fn answers(&self, addr: SocketAddr, worker: &str) -> Result<(), ServiceError> {
        let connection = self.connect(addr).await?;
        let answer = self.greet(&connection).await;
        connection.close(0u32.into(), b"probe done");
        let (answered, _) = answer?;
        if answered != worker {
            return Err(peer_error(addr, format!("worker {answered} answers there, not {worker}")));
        }
        Ok(())
    }

    /// Says `PeerHello` on `connection`: the worker that answers and its Unix socket.
    async fn greet(&self, connection: &quinn::Connection) -> Result<(String, Option<String>), ServiceError> {
        match self.call(connection, &self.hello()).await? {
            Response::PeerWelcome { worker, unix_socket } => Ok((worker, unix_socket)),
            other => Err(peer_error(connection.remote_address(), format!("expected PeerWelcome, got {other:?}"))),
        }
    }

    /// The connection to the worker at `addr` and what it said, opened
    /// (with `PeerHello`) if there is none alive.
    async fn link(&self, addr: SocketAddr) -> Result<PeerLink, ServiceError> {
        let slot = {
            let mut connections = self.connections.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            connections.entry(addr).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some(link) = slot.as_ref()
            && link.connection.close_reason().is_none()
        {
            return Ok(link.clone());
        }
        let connection = self.connect(addr).await?;
        let (worker, unix_socket) = self.greet(&connection).await?;
        let unix = unix_socket.map(PathBuf::from).filter(|path| path.exists());
        let link = PeerLink { connection, worker, unix };
        *slot = Some(link.clone());
        Ok(link)
    }

    fn hello(&self) -> Request {
        Request::PeerHello {
            protocol_version: PROTOCOL_VERSION,
            cluster_secret: self.secret.clone(),
            worker: self.me.clone(),
        }
    }

    /// A stream to `worker` on the Unix socket at `path`, `PeerHello` done:
    /// refused unless the worker answering there is `worker` (a socket at
    /// the same path on another host's worker, or this worker's own, is not
    /// the peer's).
    async fn open_unix(
        &self,
        path: &Path,
        worker: &str,
    ) -> Result<(FrameReader<tokio::net::unix::OwnedReadHalf>, FrameWriter<PeerSink>, Option<UnixCut>), ServiceError>
    {
        let unix_error = |what: &dyn std::fmt::Display| {
            ServiceError::new(ErrorKind::Io, format!("cluster peer {worker} on unix://{}: {what}", path.display()))
        };
        if self.partition.as_ref().is_some_and(|p| p.is_active()) {
            return Err(unix_error(&"this worker is cut off (injected network partition)"));
        }
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::UnixStream::connect(path))
            .await
            .map_err(|_| unix_error(&"no connection within the time-out"))?
            .map_err(|e| unix_error(&e))?;
        let cut = self.partition.as_ref().and_then(|p| UnixCut::of(&stream, p));
        let (read, write) = stream.into_split();
        let mut writer = FrameWriter::new(PeerSink::Unix(StreamSink(write)));
        writer.request(&self.hello()).await?;
        let mut reader = FrameReader::new(read, &self.buffers, MAX_FRAME_LEN);
        match tokio::time::timeout(CALL_TIMEOUT, reader.next_response()).await {
            Ok(Ok(Some(Response::PeerWelcome { worker: answered, .. }))) if answered == worker => {
                Ok((reader, writer, cut))
            }
            Ok(Ok(Some(Response::PeerWelcome { worker: answered, .. }))) => {
                Err(unix_error(&format!("worker {answered} answers there, not {worker}")))
            }
            Ok(Ok(Some(Response::Error(e)))) => Err(e),
            Ok(Ok(other)) => Err(unix_error(&format!("expected PeerWelcome, got {other:?}"))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(unix_error(&"no PeerWelcome within the time-out")),
        }
    }

    /// Sends one request on a new stream of `connection` and reads its one response.
    pub async fn call(&self, connection: &quinn::Connection, request: &Request) -> Result<Response, ServiceError> {
        let addr = connection.remote_address();
        let exchange = async {
            let (send, recv) = connection.open_bi().await.map_err(|e| peer_error(addr, e))?;
            let mut writer = FrameWriter::new(send);
            writer.request(request).await?;
            writer.finish();
            let mut reader = FrameReader::new(recv, &self.buffers, MAX_FRAME_LEN);
            match reader.next_response().await? {
                Some(Response::Error(e)) => Err(e),
                Some(response) => Ok(response),
                None => Err(peer_error(addr, "the stream ended without a response")),
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| peer_error(addr, format!("no answer within {CALL_TIMEOUT:?}")))?
    }

    /// Closes every connection (shutdown).
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
    }
}

/// The sending half of a forwarding stream.
pub enum PeerSink {
    /// A stream of the QUIC connection to the replica.
    Quic(quinn::SendStream),
    /// The replica's Unix socket (same host).
    Unix(StreamSink<tokio::net::unix::OwnedWriteHalf>),
}

impl FrameSink for PeerSink {
    async fn write_chunks(&mut self, chunks: &mut [Bytes]) -> std::io::Result<()> {
        match self {
            Self::Quic(send) => FrameSink::write_chunks(send, chunks).await,
            Self::Unix(send) => FrameSink::write_chunks(send, chunks).await,
        }
    }

    fn finish(&mut self) {
        match self {
            Self::Quic(send) => FrameSink::finish(send),
            Self::Unix(send) => FrameSink::finish(send),
        }
    }

    async fn flushed(&mut self, timeout: Duration) {
        match self {
            Self::Quic(send) => FrameSink::flushed(send, timeout).await,
            Self::Unix(send) => FrameSink::flushed(send, timeout).await,
        }
    }
}

/// One attempt's blocks of one group, forwarded from the primary to the replica.
pub struct Forward {
    /// The replica's address, for messages.
    pub replica: SocketAddr,
    writer: FrameWriter<PeerSink>,
    /// Blocks sent so far.
    pub sent: u64,
    /// Blocks the replica holds, as it last said.
    acked: watch::Receiver<u64>,
    /// The replica's verdict on the attempt's `MapEnd`.
    outcome: Option<oneshot::Receiver<Result<(), ServiceError>>>,
}

impl Forward {
    /// Opens the forwarding stream of `map` `attempt` to the replica at `replica`.
    pub async fn open(
        peers: &Peers,
        replica: SocketAddr,
        (app, shuffle): (AppId, ShuffleId),
        (map, attempt): (MapId, AttemptId),
    ) -> Result<Self, ServiceError> {
        let link = peers.link(replica).await?;
        let unix = match &link.unix {
            Some(path) => match peers.open_unix(path, &link.worker).await {
                Ok(stream) => Some(stream),
                Err(e) => {
                    tracing::info!(%replica, error = %e, "forwarding over QUIC: the replica's Unix socket is not usable");
                    None
                }
            },
            None => None,
        };
        match unix {
            Some((reader, writer, cut)) => {
                peers.forwards_unix.fetch_add(1, Ordering::Relaxed);
                Self::start(replica, reader, writer, cut, (app, shuffle), (map, attempt)).await
            }
            None => {
                let (send, recv) = link.connection.open_bi().await.map_err(|e| peer_error(replica, e))?;
                peers.forwards_quic.fetch_add(1, Ordering::Relaxed);
                let reader = FrameReader::new(recv, peers.buffers(), MAX_FRAME_LEN);
                let writer = FrameWriter::new(PeerSink::Quic(send));
                Self::start(replica, reader, writer, None, (app, shuffle), (map, attempt)).await
            }
        }
    }

    /// Sends `ReplicaPush` on a stream to the replica and follows its answers.
    async fn start<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
        replica: SocketAddr,
        mut reader: FrameReader<R>,
        mut writer: FrameWriter<PeerSink>,
        cut: Option<UnixCut>,
        (app, shuffle): (AppId, ShuffleId),
        (map, attempt): (MapId, AttemptId),
    ) -> Result<Self, ServiceError> {
        writer.request(&Request::ReplicaPush { app, shuffle, map, attempt }).await?;
        match tokio::time::timeout(CALL_TIMEOUT, reader.next_response()).await {
            Ok(Ok(Some(Response::PushAccepted { .. }))) => {}
            Ok(Ok(Some(Response::Error(e)))) => return Err(e),
            Ok(Ok(other)) => return Err(peer_error(replica, format!("expected PushAccepted, got {other:?}"))),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(peer_error(replica, "no answer to ReplicaPush")),
        }
        let (acked_tx, acked) = watch::channel(0u64);
        let (outcome_tx, outcome) = oneshot::channel();
        let follow = async move {
            let result = loop {
                match reader.next_response().await {
                    Ok(Some(Response::Acked { blocks })) => {
                        acked_tx.send_replace(blocks);
                    }
                    Ok(Some(Response::Prepared { .. })) => break Ok(()),
                    Ok(Some(Response::Error(e))) => break Err(e),
                    Ok(Some(other)) => break Err(peer_error(replica, format!("unexpected {other:?}"))),
                    Ok(None) => break Err(peer_error(replica, "the replica closed the stream")),
                    Err(e) => break Err(e),
                }
            };
            let _ = outcome_tx.send(result);
        };
        // A partition injected by the fault suite shuts a Unix stream down;
        // reading on then meets its end.
        tokio::spawn(async move {
            match cut {
                Some(cut) => cut.around(follow).await,
                None => follow.await,
            }
        });
        Ok(Self { replica, writer, sent: 0, acked, outcome: Some(outcome) })
    }

    /// Sends one block.
    pub async fn send(&mut self, block: Bytes) -> Result<(), ServiceError> {
        self.writer.blocks(&[block]).await?;
        self.sent += 1;
        Ok(())
    }

    /// Blocks the replica holds.
    pub fn acked(&self) -> u64 {
        *self.acked.borrow()
    }

    /// Changes when the replica acknowledges more.
    pub fn acked_changes(&self) -> watch::Receiver<u64> {
        self.acked.clone()
    }

    /// Sends the attempt's `MapEnd` (this group's totals) and waits for the
    /// replica to verify it.
    pub async fn end(&mut self, end: MapEnd) -> Result<(), ServiceError> {
        self.writer.request(&Request::MapEnd(end)).await?;
        self.writer.finish();
        let outcome = self.outcome.take().ok_or_else(|| peer_error(self.replica, "MapEnd forwarded twice"))?;
        tokio::time::timeout(CALL_TIMEOUT, outcome)
            .await
            .map_err(|_| peer_error(self.replica, "no verdict on the forwarded MapEnd"))?
            .map_err(|_| peer_error(self.replica, "the forwarding stream's reader stopped"))?
    }
}
