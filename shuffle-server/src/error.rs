//! The server library's error type: what can stop the server from starting.
//! Errors of individual requests are `ServiceError`s sent to their client.

use thiserror::Error;

/// Why the server could not start (or stop cleanly).
#[derive(Debug, Error)]
pub enum ServerError {
    /// The command line does not parse, or asks for help or the version
    /// (`clap::Error::exit` prints it and exits with the right code).
    #[error("{0}")]
    Usage(Box<clap::Error>),
    /// A configuration value or combination is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// The certificate or key could not be loaded or generated.
    #[error("TLS: {0}")]
    Tls(String),
    /// A file or directory operation failed.
    #[error("I/O: {0}")]
    Io(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
}
