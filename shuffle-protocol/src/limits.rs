//! Transport settings that server and client share, as plain numbers, so
//! both sides configure their QUIC endpoints alike. The server derives its
//! receive windows from its memory budget (see the server's transport); a
//! client uses these defaults for the data it receives.

/// Receive window of one stream on the client, 16 MiB: a partition read is
/// one stream, and on this project's machines a single quinn stream needed a
/// window of this size to reach ~0.5 GB/s on loopback. What a client buffers
/// is its own memory, bounded by this times its open reads.
pub const CLIENT_STREAM_RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;

/// Receive window of one client connection, 64 MiB: four reads at full speed.
pub const CLIENT_CONNECTION_RECEIVE_WINDOW: u32 = 64 * 1024 * 1024;

/// Send window of one connection, matching the largest receive window a
/// peer grants, so a sender never limits itself below what it may send.
pub const CONNECTION_SEND_WINDOW: u64 = 64 * 1024 * 1024;

/// Initial round-trip estimate, 1 ms: a data-centre network, not the internet
/// (quinn's default of 333 ms makes the first loss recovery needlessly slow).
pub const INITIAL_RTT_MICROS: u64 = 1_000;

/// Largest UDP payload QUIC may probe up to by default, 1452 bytes: what an
/// Ethernet MTU of 1500 leaves after IPv6 and UDP headers. Data centres with
/// jumbo frames (MTU 9000) raise it (`max_udp_payload` = 8952); path-MTU
/// discovery finds the largest size that gets through, up to this bound.
pub const DEFAULT_MAX_UDP_PAYLOAD: u16 = 1452;

/// Receive and send buffer asked of the kernel for every QUIC endpoint's UDP
/// socket, 4 MiB. With the default (about 208 KiB, a quarter of a
/// millisecond at loopback speed) a receiver descheduled for a moment drops
/// datagrams, and each loss halves the sender's congestion window. The
/// kernel caps it at `net.core.rmem_max` and `net.core.wmem_max`.
pub const UDP_SOCKET_BUFFER: usize = 4 << 20;
