//! Server configuration: defaults that run with no file, a TOML file given
//! with `--config FILE`, and command-line flags that override the file.
//!
//! The same keys are used in all three places (`data_dir` in the file is
//! `--data-dir` on the command line). Sizes accept `512MiB`, `2GiB`, `64KiB`
//! or a plain number of bytes; durations accept `500ms`, `30s`, `5m`, `1h`.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer};

use crate::ServerError;

/// Everything the server needs to start.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// UDP address the QUIC endpoint binds (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Directory for shuffle files and the generated certificate.
    pub data_dir: PathBuf,
    /// Server-wide memory budget for buffered blocks.
    pub memory: ByteSize,
    /// A partition's in-memory blocks are written to its file once they reach this size.
    pub flush_size: ByteSize,
    /// Free space kept on the data dir's filesystem; a flush that would eat into it fails.
    pub disk_reserve: ByteSize,
    /// PEM certificate chain; with `key`. Without both, a self-signed one is generated.
    pub cert: Option<PathBuf>,
    /// PEM private key for `cert`.
    pub key: Option<PathBuf>,
    /// When set, connections must present this token in their `Hello`.
    pub auth_token: Option<String>,
    /// An app with no open connection for this long is removed with its files.
    pub app_timeout: Duration,
    /// A connection that shows no sign of life for this long is closed.
    pub idle_timeout: Duration,
    /// On SIGTERM, in-flight requests get this long to finish before the server stops.
    pub shutdown_grace: Duration,
    /// Most connections served at once; more are refused as busy.
    pub max_connections: usize,
    /// Most concurrent request streams one connection may open.
    pub max_streams_per_connection: u32,
    /// TCP address of the `/metrics` and `/status` listener; `None`: no listener.
    /// The library's default is `None` (embedded servers open no extra port);
    /// the `shuffle-server` binary defaults to [`DEFAULT_METRICS_ADDR`].
    pub metrics_addr: Option<SocketAddr>,
}

/// Where the daemon serves `/metrics` and `/status` unless told otherwise.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9337";

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7337)),
            data_dir: PathBuf::from("./shuffle-data"),
            memory: ByteSize(1 << 30),
            flush_size: ByteSize(8 << 20),
            disk_reserve: ByteSize(1 << 30),
            cert: None,
            key: None,
            auth_token: None,
            app_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            max_connections: 1024,
            max_streams_per_connection: 512,
            metrics_addr: None,
        }
    }
}

/// The keys a TOML file may set; every key is optional and unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub memory: Option<ByteSize>,
    pub flush_size: Option<ByteSize>,
    pub disk_reserve: Option<ByteSize>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub auth_token: Option<String>,
    pub app_timeout: Option<Seconds>,
    pub idle_timeout: Option<Seconds>,
    pub shutdown_grace: Option<Seconds>,
    pub max_connections: Option<usize>,
    pub max_streams_per_connection: Option<u32>,
    pub metrics_addr: Option<OptionalAddr>,
}

impl ConfigFile {
    /// Reads and parses a TOML file.
    pub fn load(path: &std::path::Path) -> Result<Self, ServerError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ServerError::Config(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))
    }

    /// Applies every key this file (or command line) sets on top of `config`.
    pub fn apply(self, config: &mut ServerConfig) {
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { config.$field = v.into(); } )* };
        }
        set!(listen, data_dir, memory, flush_size, disk_reserve, app_timeout, idle_timeout, shutdown_grace);
        set!(max_connections, max_streams_per_connection, metrics_addr);
        if let Some(v) = self.cert {
            config.cert = Some(v);
        }
        if let Some(v) = self.key {
            config.key = Some(v);
        }
        if let Some(v) = self.auth_token {
            config.auth_token = Some(v);
        }
    }
}

impl ServerConfig {
    /// Checks combinations that no single key can get wrong on its own.
    pub fn validate(&self) -> Result<(), ServerError> {
        if self.cert.is_some() != self.key.is_some() {
            return Err(ServerError::Config("--cert and --key must be given together".into()));
        }
        if self.memory.0 < 1 << 20 {
            return Err(ServerError::Config(format!("memory budget {} is below the minimum of 1MiB", self.memory)));
        }
        if self.flush_size.0 == 0 || self.flush_size.0 > self.memory.0 {
            return Err(ServerError::Config(format!(
                "flush_size {} must be above zero and not above the memory budget {}",
                self.flush_size, self.memory
            )));
        }
        if matches!(&self.auth_token, Some(t) if t.is_empty()) {
            return Err(ServerError::Config("auth_token must not be empty".into()));
        }
        Ok(())
    }
}

/// A socket address, or `off` for none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

impl From<OptionalAddr> for Option<SocketAddr> {
    fn from(a: OptionalAddr) -> Self {
        a.0
    }
}

impl FromStr for OptionalAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "off" {
            return Ok(Self(None));
        }
        s.trim()
            .parse()
            .map(|a| Self(Some(a)))
            .map_err(|_| format!("{s:?} is not an address such as 127.0.0.1:9337 or off"))
    }
}

impl<'de> Deserialize<'de> for OptionalAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A number of bytes, written with a binary unit suffix or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size such as 512MiB or 2GiB"))?;
        let shift = match unit.trim() {
            "" | "B" => 0,
            "KiB" | "K" | "KB" => 10,
            "MiB" | "M" | "MB" => 20,
            "GiB" | "G" | "GB" => 30,
            "TiB" | "T" | "TB" => 40,
            other => {
                return Err(format!("unknown size unit {other:?} in {s:?} (use B, KiB, MiB, GiB or TiB)"));
            }
        };
        n.checked_mul(1 << shift).map(ByteSize).ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];
        for (shift, unit) in units {
            if self.0 >= 1 << shift && self.0 % (1 << shift) == 0 {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A duration written as `500ms`, `30s`, `5m` or `1h` (a bare number is seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seconds(pub Duration);

impl From<Seconds> for Duration {
    fn from(s: Seconds) -> Self {
        s.0
    }
}

impl FromStr for Seconds {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a duration such as 30s or 5m"))?;
        let d = match unit.trim() {
            "ms" => Duration::from_millis(n),
            "" | "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            other => {
                return Err(format!("unknown duration unit {other:?} in {s:?} (use ms, s, m or h)"));
            }
        };
        Ok(Seconds(d))
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Seconds(Duration::from_secs(n))),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!("512MiB".parse(), Ok(ByteSize(512 << 20)));
        assert_eq!("2GiB".parse(), Ok(ByteSize(2 << 30)));
        assert_eq!("4096".parse(), Ok(ByteSize(4096)));
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert!("MiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(512 << 20).to_string(), "512MiB");
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!("30s".parse(), Ok(Seconds(Duration::from_secs(30))));
        assert_eq!("250ms".parse(), Ok(Seconds(Duration::from_millis(250))));
        assert_eq!("5m".parse(), Ok(Seconds(Duration::from_secs(300))));
        assert!("5 fortnights".parse::<Seconds>().is_err());
    }

    #[test]
    fn file_keys_override_defaults_and_unknown_keys_are_refused() {
        let file: ConfigFile = toml::from_str(
            "listen = \"0.0.0.0:9000\"\nmemory = \"512MiB\"\ndata_dir = \"/tmp/x\"\napp_timeout = \"10s\"",
        )
        .unwrap();
        let mut config = ServerConfig::default();
        file.apply(&mut config);
        assert_eq!(config.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(config.memory, ByteSize(512 << 20));
        assert_eq!(config.app_timeout, Duration::from_secs(10));
        assert!(toml::from_str::<ConfigFile>("memroy = \"1GiB\"").is_err());
    }
}
