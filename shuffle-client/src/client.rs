//! [`ShuffleClient`]: the links to one server, bound to one app.
//!
//! Over QUIC a client holds two connections (one for control requests and
//! pushes, one for partition reads, so each has its own crypto and packet
//! work). When the server says it has a Unix socket and the client can open
//! it and finds the same server behind it (the same server id in its
//! `Welcome`), everything moves to the socket and the QUIC connections are
//! closed. [`ShuffleClient::connect_unix`] goes straight to a socket (the
//! embedded server is always reached that way).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls::pki_types::{CertificateDer, pem::PemObject};
use shuffle_protocol::{
    AppId, AppSecret, AttemptId, Codec, ErrorKind, MapId, PROTOCOL_VERSION, PartitionId, Request, Response, ServerRole,
    ShuffleId, ShuffleSpec,
};

use crate::{
    AppCredentials, ClientError, ClientOptions, MapWriter, PartitionReader,
    cluster::ClusterState,
    transport::{Link, open_request, transport_config},
    unix::UnixLink,
};

/// ALPN protocol id, as the server's.
const ALPN: &[u8] = b"shuffle/1";

/// Links to the shuffle service for one app. Cheap to clone; clones share the links.
#[derive(Clone)]
pub struct ShuffleClient {
    inner: Arc<Inner>,
}

struct Inner {
    /// Kept so the QUIC connections' UDP socket lives as long as the client.
    endpoint: Option<quinn::Endpoint>,
    /// Links for control requests (the first) and push streams (round robin).
    pushes: Vec<Link>,
    /// Links for partition reads, round robin (the Unix socket: the same link).
    reads: Vec<Link>,
    /// Source of the round robin.
    next_link: std::sync::atomic::AtomicUsize,
    /// Options the client was made with.
    options: ClientOptions,
    /// The app this client is bound to, and its secret.
    credentials: AppCredentials,
    app: AppId,
    /// The server's Unix socket, when the client uses it.
    unix_socket: Option<PathBuf>,
    /// Block bytes pushed by this client's writers (headers included), as the server counts them.
    pushed_bytes: Arc<std::sync::atomic::AtomicU64>,
    /// Connected to a cluster's coordinator: placements and the workers' clients.
    cluster: Option<Arc<ClusterState>>,
}

/// What a server's `Welcome` said.
pub(crate) struct Welcomed {
    pub secret: AppSecret,
    pub server_id: String,
    pub unix_socket: Option<String>,
    pub role: ServerRole,
}

impl ShuffleClient {
    /// Connects to the server at `addr` and binds the client to
    /// `options.app`: creates the app (no secret in the options) or joins
    /// it. Moves to the server's Unix socket when it is on this host.
    pub async fn connect(addr: SocketAddr, options: ClientOptions) -> Result<Self, ClientError> {
        Self::connect_to(addr, options, true).await
    }

    /// [`Self::connect`]; `wait_to_join`: a joining client waits out a
    /// server that is away. A cluster client's link to one of its workers
    /// does not: a dead worker is failed over, not waited for.
    pub(crate) async fn connect_to(
        addr: SocketAddr,
        options: ClientOptions,
        wait_to_join: bool,
    ) -> Result<Self, ClientError> {
        let app = AppId::new(options.app.clone()).map_err(|e| ClientError::Options(e.to_string()))?;
        let connect_err = |reason: String| ClientError::Connect { addr, reason };
        let config = quic_client_config(&options)?;
        let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("valid literal");
        let mut endpoint = quic_endpoint(bind).map_err(|e| connect_err(e.to_string()))?;
        endpoint.set_default_client_config(config);
        let (control, welcome) = if wait_to_join {
            join_or_create(&endpoint, addr, &options, &app).await?
        } else {
            open_connection(&endpoint, addr, &options, &app, options.secret.clone()).await?
        };
        let secret = welcome.secret.clone();
        if welcome.role == ServerRole::Coordinator {
            // Control goes to the coordinator; pushes and reads to the workers of each placement.
            let cluster = Arc::new(ClusterState::new(addr, endpoint.clone(), control.clone()));
            let links = vec![Link::Quic(control)];
            let mut client = Self::assemble(Some(endpoint), links.clone(), links, options, app, secret, None);
            Arc::get_mut(&mut client.inner).expect("not shared yet").cluster = Some(cluster);
            return Ok(client);
        }
        if options.same_host
            && let Some(path) = welcome.unix_socket.as_deref().map(Path::new)
            && path.exists()
        {
            match UnixLink::connect(path, &app, Some(secret.clone()), &options).await {
                Ok((link, unix_welcome)) if unix_welcome.server_id == welcome.server_id => {
                    control.close(0u32.into(), b"moving to the Unix socket");
                    let link = Link::Unix(Arc::new(link));
                    tracing::debug!(socket = %path.display(), "using the server's Unix socket");
                    let links = vec![link];
                    return Ok(Self::assemble(None, links.clone(), links, options, app, secret, Some(path.into())));
                }
                Ok(_) => {
                    tracing::debug!(socket = %path.display(), "another server answers on that socket; staying on QUIC")
                }
                Err(e) => {
                    tracing::debug!(socket = %path.display(), error = %e, "cannot use the Unix socket; staying on QUIC")
                }
            }
        }
        let mut links = vec![Link::Quic(control)];
        while links.len() < options.quic_connections.max(2) {
            let (more, _) = open_connection(&endpoint, addr, &options, &app, Some(secret.clone())).await?;
            links.push(Link::Quic(more));
        }
        let reads = links.split_off(links.len() / 2);
        Ok(Self::assemble(Some(endpoint), links, reads, options, app, secret, None))
    }

    /// Connects through the server's Unix socket at `path` only.
    pub async fn connect_unix(path: impl AsRef<Path>, options: ClientOptions) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let app = AppId::new(options.app.clone()).map_err(|e| ClientError::Options(e.to_string()))?;
        let connect = UnixLink::connect(path, &app, options.secret.clone(), &options);
        let (link, welcome) =
            tokio::time::timeout(options.connect_timeout, connect).await.map_err(|_| ClientError::ConnectUnix {
                path: path.into(),
                reason: format!("no Welcome within {:?}", options.connect_timeout),
            })??;
        let links = vec![Link::Unix(Arc::new(link))];
        Ok(Self::assemble(None, links.clone(), links, options, app, welcome.secret, Some(path.into())))
    }

    fn assemble(
        endpoint: Option<quinn::Endpoint>,
        pushes: Vec<Link>,
        reads: Vec<Link>,
        options: ClientOptions,
        app: AppId,
        secret: AppSecret,
        unix_socket: Option<PathBuf>,
    ) -> Self {
        let credentials = AppCredentials { app: app.to_string(), secret };
        Self {
            inner: Arc::new(Inner {
                endpoint,
                pushes,
                reads,
                next_link: std::sync::atomic::AtomicUsize::new(0),
                options,
                credentials,
                app,
                unix_socket,
                pushed_bytes: Arc::default(),
                cluster: None,
            }),
        }
    }

    /// The cluster this client reaches through its coordinator, if it does.
    pub(crate) fn cluster(&self) -> Option<&Arc<ClusterState>> {
        self.inner.cluster.as_ref()
    }

    /// A cluster's placement of `shuffle`, as the coordinator has it now
    /// (`None` for a client of a standalone server).
    pub async fn placement(&self, shuffle: ShuffleId) -> Result<Option<shuffle_protocol::Placement>, ClientError> {
        if self.inner.cluster.is_none() {
            return Ok(None);
        }
        Ok(Some((*crate::cluster::placement(self, shuffle, true).await?).clone()))
    }

    /// Whether this client reached a cluster's coordinator (pushes and
    /// reads then go to the workers of each shuffle's placement).
    pub fn is_cluster(&self) -> bool {
        self.inner.cluster.is_some()
    }

    /// How many times this cluster client connected to worker `worker` (0
    /// for a standalone client, or a worker it never used): more than one
    /// means it dropped or lost its connection to the worker and made a new one.
    pub fn worker_connects(&self, worker: &str) -> u64 {
        self.inner.cluster.as_ref().map_or(0, |c| c.connects(worker))
    }

    /// The counter of pushed block bytes, shared with writers.
    pub(crate) fn pushed_counter(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.inner.pushed_bytes.clone()
    }

    /// The app this client is bound to.
    pub fn app(&self) -> &AppId {
        &self.inner.app
    }

    /// The app's name and secret, to hand to processes that should join it
    /// (see [`AppCredentials::to_env`] and [`ClientOptions::joining`]).
    pub fn credentials(&self) -> &AppCredentials {
        &self.inner.credentials
    }

    /// The server's Unix socket, when this client talks to the server through it.
    pub fn unix_socket(&self) -> Option<&Path> {
        self.inner.unix_socket.as_deref()
    }

    /// Block bytes this client's writers have pushed, block headers included:
    /// what the server counts as received.
    pub fn pushed_bytes(&self) -> u64 {
        self.inner.pushed_bytes.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The options the client was made with.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// The next link of `links`, round robin.
    fn next_link<'a>(&self, links: &'a [Link]) -> &'a Link {
        let n = self.inner.next_link.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &links[n % links.len()]
    }

    /// Whether one of the client's links was closed (see [`Link::is_closed`]).
    pub(crate) fn is_closed(&self) -> bool {
        self.inner.pushes.iter().chain(&self.inner.reads).any(Link::is_closed)
    }

    /// Whether this client talks to the server through its Unix socket.
    pub(crate) fn same_host(&self) -> bool {
        self.inner.pushes[0].is_unix()
    }

    /// Opens a push stream for `request` (`OpenPush` or a cluster's
    /// `OpenFailoverPush`) and waits for `PushAccepted`; the spec as this
    /// client's writers use it.
    pub(crate) async fn open_push(
        &self,
        request: &Request,
    ) -> Result<(crate::transport::StreamSend, crate::transport::FrameReader, ShuffleSpec), ClientError> {
        let (send, mut reader) = open_request(self.next_link(&self.inner.pushes), request, false).await?;
        match reader.response().await? {
            Response::PushAccepted { mut spec } => {
                // In memory on this host, lz4 costs CPU and saves nothing.
                if self.same_host() && !self.inner.options.compress_same_host {
                    spec.codec = Codec::None;
                }
                Ok((send, reader, spec))
            }
            other => Err(ClientError::Protocol(format!("expected PushAccepted, got {other:?}"))),
        }
    }

    /// Opens a read stream for `request` (a partition read of any kind).
    /// Our side ends with the request, except for a key-ordered read
    /// (`OpenPartitionByKey`), which asks for its chunks on it.
    pub(crate) async fn open_read(
        &self,
        request: &Request,
    ) -> Result<(crate::transport::StreamSend, crate::transport::FrameReader), ClientError> {
        let by_key = matches!(request, Request::OpenPartitionByKey { .. });
        let (send, mut reader) = open_request(self.next_link(&self.inner.reads), request, !by_key).await?;
        if matches!(
            request,
            Request::OpenPartitionDirect { .. }
                | Request::OpenPartitionFrom { direct: true, .. }
                | Request::OpenPartitionByKey { direct: true, .. }
        ) {
            // Nothing was read from the stream yet: every descriptor the server passes is kept.
            reader.receive_files();
        }
        Ok((send, reader))
    }

    /// Whether reads should take the server's files directly.
    pub(crate) fn reads_directly(&self) -> bool {
        self.same_host() && self.inner.options.direct_reads
    }

    /// Sends a request that is answered by `Ok`.
    async fn call_ok(&self, request: &Request) -> Result<(), ClientError> {
        if self.inner.cluster.is_some() {
            return match crate::cluster::coordinator_call(self, request).await? {
                Response::Ok => Ok(()),
                other => Err(ClientError::Protocol(format!("expected Ok, got {other:?}"))),
            };
        }
        let (_send, mut reader) = open_request(&self.inner.pushes[0], request, true).await?;
        match reader.response().await? {
            Response::Ok => Ok(()),
            other => Err(ClientError::Protocol(format!("expected Ok, got {other:?}"))),
        }
    }

    /// Registers a shuffle; registering the same id with an equal spec again is a no-op.
    pub async fn register_shuffle(&self, shuffle: ShuffleId, spec: ShuffleSpec) -> Result<(), ClientError> {
        if self.inner.cluster.is_some() {
            return crate::cluster::register(self, shuffle, spec).await;
        }
        self.call_ok(&Request::RegisterShuffle { shuffle, spec }).await
    }

    /// Removes a shuffle with its memory and files on the server.
    pub async fn unregister_shuffle(&self, shuffle: ShuffleId) -> Result<(), ClientError> {
        self.call_ok(&Request::UnregisterShuffle { shuffle }).await
    }

    /// Removes the app and all its shuffles on the server.
    pub async fn unregister_app(&self) -> Result<(), ClientError> {
        self.call_ok(&Request::UnregisterApp).await
    }

    /// Opens a writer for attempt `attempt` of map `map`.
    pub async fn writer(&self, shuffle: ShuffleId, map: MapId, attempt: AttemptId) -> Result<MapWriter, ClientError> {
        if self.inner.cluster.is_some() {
            return crate::cluster::writer(self, shuffle, map, attempt).await;
        }
        let (send, reader, spec) = self.open_push(&Request::OpenPush { shuffle, map, attempt }).await?;
        let counter = self.inner.pushed_bytes.clone();
        Ok(MapWriter::new(send, reader, (shuffle, map, attempt), spec, &self.inner.options, counter))
    }

    /// Opens a reader of `partition`; it yields records once every map has
    /// committed (hybrid: as they arrive). On the Unix socket the server
    /// hands over blocks that lie in files as the open files themselves and
    /// the reader reads them (checking every block as it would a frame).
    pub async fn reader(&self, shuffle: ShuffleId, partition: PartitionId) -> Result<PartitionReader, ClientError> {
        if self.inner.cluster.is_some() {
            return crate::cluster::reader(self, shuffle, partition).await;
        }
        // The reader opens its stream on its first call, which says whether it reads by key.
        Ok(PartitionReader::new(self.next_link(&self.inner.reads).clone(), self.reads_directly(), shuffle, partition))
    }

    /// Closes the links gracefully and waits (at most 2 s) for the server to see it.
    pub async fn close(self) {
        if let Some(cluster) = &self.inner.cluster {
            cluster.close().await;
        }
        for link in self.inner.pushes.iter().chain(&self.inner.reads) {
            link.close();
        }
        if let Some(endpoint) = &self.inner.endpoint {
            // The servers acknowledge the close within a few round trips;
            // one that vanished, or whose connection backed its timers off
            // while it was stopped, would keep a close waiting for minutes.
            let _ = tokio::time::timeout(CLOSE_WAIT, endpoint.wait_idle()).await;
        }
    }
}

/// The longest [`ShuffleClient::close`] waits for the servers to acknowledge it.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// How often a joining client tries again while the server is away.
const JOIN_RETRY: Duration = Duration::from_millis(250);

/// Asks for [`shuffle_protocol::limits::UDP_SOCKET_BUFFER`] of receive and send buffer on `socket`.
fn size_udp_buffers(socket: &std::net::UdpSocket) -> rustix::io::Result<()> {
    let bytes = shuffle_protocol::limits::UDP_SOCKET_BUFFER;
    rustix::net::sockopt::set_socket_recv_buffer_size(socket, bytes)?;
    rustix::net::sockopt::set_socket_send_buffer_size(socket, bytes)
}

/// A QUIC client endpoint bound to `bind`, its UDP socket's buffers sized
/// as [`shuffle_protocol::limits::UDP_SOCKET_BUFFER`] says (a performance
/// setting only: a refusal is logged and the kernel's default kept).
pub fn quic_endpoint(bind: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(bind)?;
    if let Err(e) = size_udp_buffers(&socket) {
        tracing::debug!(error = %e, "cannot size the UDP socket's buffers");
    }
    let runtime = std::sync::Arc::new(quinn::TokioRuntime);
    quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
}

/// The first connection of a client: creates `app` (no secret in the
/// options) or joins it. A joining client (a task started mid-job) waits
/// out a server that is away or says to retry (a coordinator restarting,
/// which learns its apps from its workers' reports) for up to
/// [`ClientOptions::coordinator_wait`], as an open client's requests do; a
/// creating client fails at once.
async fn join_or_create(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    options: &ClientOptions,
    app: &AppId,
) -> Result<(quinn::Connection, Welcomed), ClientError> {
    // tokio's clock: the same as std's, but a test can pause it.
    let deadline = tokio::time::Instant::now() + options.coordinator_wait;
    loop {
        match open_connection(endpoint, addr, options, app, options.secret.clone()).await {
            Err(e)
                if options.secret.is_some()
                    && (e.is_unreachable() || e.service_kind() == Some(ErrorKind::Unavailable))
                    && tokio::time::Instant::now() < deadline =>
            {
                tracing::info!(%addr, %app, error = %e, "cannot join the app yet; retrying");
                tokio::time::sleep(JOIN_RETRY).await;
            }
            other => return other,
        }
    }
}

/// Connects, handshakes and says `Hello` for `app`.
pub(crate) async fn open_connection(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    options: &ClientOptions,
    app: &AppId,
    secret: Option<AppSecret>,
) -> Result<(quinn::Connection, Welcomed), ClientError> {
    let connect_err = |reason: String| ClientError::Connect { addr, reason };
    let connecting = endpoint.connect(addr, &options.server_name).map_err(|e| connect_err(e.to_string()))?;
    let timeout = options.connect_timeout;
    let connection = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| connect_err(format!("no handshake within {timeout:?}")))?
        .map_err(|e| connect_err(e.to_string()))?;
    let hello = Request::Hello {
        protocol_version: PROTOCOL_VERSION,
        app: app.clone(),
        secret,
        auth_token: options.auth_token.clone(),
    };
    let link = Link::Quic(connection.clone());
    let welcome = async {
        let (_send, mut reader) = open_request(&link, &hello, true).await?;
        reader.response().await
    };
    match tokio::time::timeout(timeout, welcome).await {
        Ok(Ok(Response::Welcome { app_secret, server_id, unix_socket, role, .. })) => {
            Ok((connection, Welcomed { secret: app_secret, server_id, unix_socket, role }))
        }
        Ok(Ok(other)) => Err(ClientError::Protocol(format!("expected Welcome, got {other:?}"))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(connect_err(format!("no answer to Hello within {timeout:?}"))),
    }
}

/// The QUIC client configuration a [`ShuffleClient`] uses: TLS 1.3 trusting
/// `options.trusted_cert`, the service's ALPN and transport settings. For
/// tools that measure or probe the server below the client's API.
pub fn quic_client_config(options: &ClientOptions) -> Result<quinn::ClientConfig, ClientError> {
    let crypto = client_crypto(options)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config(options.idle_timeout, options.max_udp_payload));
    Ok(config)
}

/// TLS 1.3 client configuration trusting the configured certificate.
fn client_crypto(options: &ClientOptions) -> Result<quinn::crypto::rustls::QuicClientConfig, ClientError> {
    let path = options.trusted_cert.as_ref().ok_or_else(|| {
        ClientError::Options("no trusted certificate: set ClientOptions::trusted_cert to the server's cert.pem".into())
    })?;
    let bad = |e: &dyn std::fmt::Display| ClientError::Options(format!("{}: {e}", path.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    if roots.is_empty() {
        return Err(bad(&"no certificate in file"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Options(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| ClientError::Options(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use shuffle_protocol::AppSecret;

    use super::ShuffleClient;
    use crate::ClientOptions;

    #[test]
    fn a_quic_socket_gets_the_buffers_asked_for_up_to_the_kernels_caps() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (recv_default, send_default) = (
            rustix::net::sockopt::socket_recv_buffer_size(&socket).unwrap(),
            rustix::net::sockopt::socket_send_buffer_size(&socket).unwrap(),
        );
        super::size_udp_buffers(&socket).unwrap();
        let asked = shuffle_protocol::limits::UDP_SOCKET_BUFFER;
        let cap = |name: &str| -> usize {
            std::fs::read_to_string(format!("/proc/sys/net/core/{name}")).unwrap().trim().parse().unwrap()
        };
        // Linux doubles what it grants (for its bookkeeping) and caps the request.
        for (what, got, default, cap) in [
            ("receive", rustix::net::sockopt::socket_recv_buffer_size(&socket).unwrap(), recv_default, cap("rmem_max")),
            ("send", rustix::net::sockopt::socket_send_buffer_size(&socket).unwrap(), send_default, cap("wmem_max")),
        ] {
            assert!(got >= asked.min(cap), "{what}: asked {asked}, cap {cap}, got {got}");
            if cap >= asked {
                assert!(got > default, "{what}: asked {asked} over the default {default}, got {got}");
            }
        }
    }

    /// A client joining an app waits for its server up to `coordinator_wait`;
    /// a cluster client's link to one of its workers gives up after one
    /// connect time-out, so a dead worker is failed over, not waited for.
    /// The clock is tokio's paused one: the durations are virtual.
    #[tokio::test(start_paused = true)]
    async fn a_link_to_a_dead_worker_fails_after_one_attempt_while_a_joining_client_waits() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
        let cert_path = dir.path().join("cert.pem");
        std::fs::write(&cert_path, cert.cert.pem()).expect("write certificate");
        // A port nothing listens on: bound, then closed.
        let dead = std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("free port");
        let mut options = ClientOptions::new("app").trusted_cert(&cert_path).secret(AppSecret("0".repeat(64)));
        options.connect_timeout = Duration::from_millis(100);
        options.coordinator_wait = Duration::from_secs(5);

        let start = tokio::time::Instant::now();
        let err = ShuffleClient::connect_to(dead, options.clone(), false).await.err().expect("nothing listens there");
        let link_waited = start.elapsed();
        assert!(err.is_unreachable(), "a link to a dead worker reports it unreachable: {err}");
        assert!(
            link_waited < Duration::from_secs(1),
            "a link to a dead worker gave up after {link_waited:?}, not after one connect time-out"
        );

        let start = tokio::time::Instant::now();
        let err = ShuffleClient::connect(dead, options.clone()).await.err().expect("nothing listens there");
        let joiner_waited = start.elapsed();
        assert!(err.is_unreachable(), "{err}");
        assert!(
            joiner_waited >= options.coordinator_wait,
            "a joining client gave up after {joiner_waited:?}, before coordinator_wait"
        );
    }
}
