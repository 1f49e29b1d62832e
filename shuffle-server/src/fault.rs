//! Fault injection for the fault suite, off unless the server starts with
//! `--fault-injection`: a network partition of this process on demand
//! (`POST /fault/partition?millis=N` on the admin listener).
//!
//! While a partition lasts, every UDP datagram the process's QUIC endpoints
//! send or receive is dropped (as a firewall that drops a host's packets
//! would: connections go silent, they are not closed, and they resume if
//! the partition ends before their idle time-out), and every Unix-socket
//! stream it serves or opened is closed and new ones are refused (a
//! partitioned worker would not share a host with anyone it reaches over
//! a Unix socket, so those streams go too).

use std::{
    fmt,
    io::{self, IoSliceMut},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use quinn::{AsyncUdpSocket, UdpPoller, udp::RecvMeta, udp::Transmit};
use tokio_util::sync::CancellationToken;

/// Whether this process is partitioned now, and the signal its Unix
/// streams close on.
pub struct Partition {
    /// When the partition ends, in milliseconds after `epoch`; 0 if none was injected.
    until: AtomicU64,
    epoch: Instant,
    /// Cancelled when a partition starts; replaced by a fresh one.
    cut: Mutex<CancellationToken>,
}

impl Default for Partition {
    fn default() -> Self {
        Self { until: AtomicU64::new(0), epoch: Instant::now(), cut: Mutex::new(CancellationToken::new()) }
    }
}

impl fmt::Debug for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Partition").field("active", &self.is_active()).finish()
    }
}

impl Partition {
    /// Cuts this process off for `duration` from now (a partition already
    /// in progress is extended or shortened to end then).
    pub fn start(&self, duration: Duration) {
        let end = self.epoch.elapsed() + duration;
        self.until.store(end.as_millis().max(1) as u64, Ordering::Release);
        let old = std::mem::take(&mut *crate::storage::lock(&self.cut));
        old.cancel();
        tracing::warn!(millis = duration.as_millis() as u64, "fault injection: network partition of this process");
    }

    /// Whether a partition is in progress.
    pub fn is_active(&self) -> bool {
        let until = self.until.load(Ordering::Acquire);
        until != 0 && (self.epoch.elapsed().as_millis() as u64) < until
    }

    /// Cancelled when the next partition starts (a Unix stream that began
    /// before it ends then).
    pub fn next_cut(&self) -> CancellationToken {
        crate::storage::lock(&self.cut).clone()
    }
}

/// Closes one Unix stream when a partition starts: shuts its socket down
/// both ways, so whoever holds it reads the end of the stream and fails to
/// write, as when a connection is dropped.
pub struct UnixCut {
    /// A duplicate of the stream's descriptor (shutting it down shuts the
    /// stream's socket down), held no longer than the stream's server.
    socket: std::os::fd::OwnedFd,
    cut: CancellationToken,
}

impl UnixCut {
    /// Watches `stream` for the next partition of `partition`; `None` if
    /// its descriptor cannot be duplicated (then it is not cut).
    pub fn of(stream: &tokio::net::UnixStream, partition: &Partition) -> Option<Self> {
        use std::os::fd::AsFd;
        let socket = stream.as_fd().try_clone_to_owned().ok()?;
        Some(Self { socket, cut: partition.next_cut() })
    }

    /// Runs `serve` (which owns the stream) to its end, shutting the stream
    /// down if a partition starts first.
    pub async fn around(self, serve: impl Future<Output = ()>) {
        tokio::pin!(serve);
        tokio::select! {
            () = &mut serve => return,
            () = self.cut.cancelled() => self.shut_down(),
        }
        serve.await;
    }

    /// Shuts the stream's socket down both ways.
    fn shut_down(&self) {
        if let Err(e) = rustix::net::shutdown(&self.socket, rustix::net::Shutdown::Both) {
            tracing::debug!(error = %e, "shutting a Unix stream down for the injected partition");
        }
    }
}

/// A UDP socket whose datagrams are dropped, both ways, while `partition` is active.
#[derive(Debug)]
pub struct PartitionedSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    partition: Arc<Partition>,
}

/// Asks for [`shuffle_protocol::limits::UDP_SOCKET_BUFFER`] of receive and
/// send buffer on a QUIC endpoint's socket.
fn size_udp_buffers(socket: &std::net::UdpSocket) -> rustix::io::Result<()> {
    let bytes = shuffle_protocol::limits::UDP_SOCKET_BUFFER;
    rustix::net::sockopt::set_socket_recv_buffer_size(socket, bytes)?;
    rustix::net::sockopt::set_socket_send_buffer_size(socket, bytes)
}

/// A UDP socket bound to `addr` for a QUIC endpoint, its buffers sized by
/// [`size_udp_buffers`]; with a `partition`
/// (`--fault-injection`), one whose datagrams the partition drops.
pub fn udp_socket(
    addr: std::net::SocketAddr,
    partition: Option<&Arc<Partition>>,
) -> io::Result<Arc<dyn AsyncUdpSocket>> {
    let socket = std::net::UdpSocket::bind(addr)?;
    if let Err(e) = size_udp_buffers(&socket) {
        // Only a performance setting: the endpoint works with the kernel's default.
        tracing::debug!(error = %e, "cannot size the UDP socket's buffers");
    }
    let inner = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, socket)?;
    Ok(match partition {
        Some(partition) => Arc::new(PartitionedSocket { inner, partition: partition.clone() }),
        None => inner,
    })
}

impl AsyncUdpSocket for PartitionedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if self.partition.is_active() {
            // Lost on the way, as a dropped packet is.
            return Ok(());
        }
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.inner.poll_recv(cx, bufs, meta) {
                // Dropped: read on until the socket has nothing (which registers the waker).
                Poll::Ready(Ok(_)) if self.partition.is_active() => continue,
                other => return other,
            }
        }
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quic_socket_gets_the_buffers_asked_for_up_to_the_kernels_caps() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (recv_default, send_default) = (
            rustix::net::sockopt::socket_recv_buffer_size(&socket).unwrap(),
            rustix::net::sockopt::socket_send_buffer_size(&socket).unwrap(),
        );
        size_udp_buffers(&socket).unwrap();
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

    #[test]
    fn a_partition_is_active_for_its_duration_and_cancels_the_streams_before_it() {
        let p = Partition::default();
        assert!(!p.is_active());
        let before = p.next_cut();
        p.start(Duration::from_millis(200));
        assert!(p.is_active());
        assert!(before.is_cancelled());
        assert!(!p.next_cut().is_cancelled(), "streams opened after the cut are not cut by it");
        std::thread::sleep(Duration::from_millis(250));
        assert!(!p.is_active());
    }
}
