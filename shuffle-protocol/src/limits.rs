//! Transport limits that server and client must agree on to perform well.
//! Plain numbers, so both sides configure their QUIC endpoints alike.

/// Receive window of one stream, 16 MiB. One stream carries one map attempt's
/// push or one partition's read; on this project's machines a single quinn
/// stream needed a window of this size to reach ~0.5 GB/s on loopback, and
/// the server's memory budget (1 GiB by default) covers dozens of such streams.
pub const STREAM_RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;

/// Receive window of one connection, 64 MiB: four streams at full speed.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 64 * 1024 * 1024;

/// Send window of one connection, matching the peer's connection window.
pub const CONNECTION_SEND_WINDOW: u64 = 64 * 1024 * 1024;

/// Initial round-trip estimate, 1 ms: a data-centre network, not the internet
/// (quinn's default of 333 ms makes the first loss recovery needlessly slow).
pub const INITIAL_RTT_MICROS: u64 = 1_000;
