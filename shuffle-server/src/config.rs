//! Server configuration: one struct, [`ServerConfig`], that is at once the
//! command line (clap), the TOML file (serde) and what the library takes.
//!
//! Defaults run with no file. `--config FILE` loads a TOML file with the
//! same keys as the flags (`data_dir` in the file is `--data-dir` on the
//! command line); a flag given on the command line wins over the file, the
//! file over the defaults. Sizes are written `512MiB`, `2GiB` (bytesize);
//! durations `500ms`, `30s`, `5m` (humantime). The admission token is never
//! a flag (argv is visible to every user of the host): it comes from
//! `--auth-token-file` or the `SHUFFLE_AUTH_TOKEN` environment variable.

use std::{net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use bytesize::ByteSize;
use clap::{CommandFactory, FromArgMatches, Parser, parser::ValueSource};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ServerError;

/// Where the daemon serves `/metrics` and `/status` unless told otherwise.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9337";

/// The environment variable the admission token may come from.
pub const AUTH_TOKEN_ENV: &str = "SHUFFLE_AUTH_TOKEN";

/// The environment variable the cluster secret may come from.
pub const CLUSTER_SECRET_ENV: &str = "SHUFFLE_CLUSTER_SECRET";

/// What the process is in a cluster (DESIGN.md, "Cluster").
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Coordinator and worker in one process: the single-node service.
    Standalone,
    /// Places shuffles on workers and decides commits; holds no data.
    Coordinator,
    /// Holds partitions the coordinator places on it (needs --coordinator).
    Worker,
}

impl Role {
    /// The role as the protocol names it.
    pub fn protocol(self) -> shuffle_protocol::ServerRole {
        match self {
            Self::Standalone => shuffle_protocol::ServerRole::Standalone,
            Self::Coordinator => shuffle_protocol::ServerRole::Coordinator,
            Self::Worker => shuffle_protocol::ServerRole::Worker,
        }
    }
}

/// Everything the server needs to start.
#[derive(Clone, Debug, Parser, Serialize, Deserialize)]
#[command(name = "shuffle-server", version, about = "Remote shuffle service daemon")]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// TOML file with the same keys as these flags (data_dir, memory, ...); flags override it.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// standalone (the default), coordinator, or worker.
    #[arg(value_enum, default_value = "standalone")]
    pub role: Role,
    /// Workers: the coordinator's QUIC address, or several (tried in turn) separated by commas.
    #[arg(long, value_name = "ADDR[,ADDR]", value_delimiter = ',')]
    #[serde(default)]
    pub coordinator: Vec<SocketAddr>,
    /// Workers: the address clients and other workers reach this worker at (default: --listen).
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub advertise: Option<SocketAddr>,
    /// Workers: a stable id (default: the one kept in the data dir, created on first start).
    #[arg(long, value_name = "ID")]
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub worker_id: Option<String>,
    /// File holding the secret coordinator and workers share (or set SHUFFLE_CLUSTER_SECRET).
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cluster_secret_file: Option<PathBuf>,
    /// The cluster secret itself, read from `cluster_secret_file` or the environment; never a flag.
    #[arg(skip)]
    #[serde(skip)]
    pub cluster_secret: Option<String>,
    /// The name the certificate carries, which cluster processes check when they connect to each other.
    #[arg(long, value_name = "NAME", default_value = "localhost")]
    pub tls_name: String,
    /// Workers heartbeat to the coordinator this often.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// The coordinator declares a worker lost after this long without a heartbeat.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub worker_timeout: Duration,
    /// A decommissioned worker exits after this long even if it still holds shuffles.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub decommission_timeout: Duration,
    /// Write a self-signed certificate and key for --tls-name into this directory and exit.
    #[arg(long, value_name = "DIR")]
    #[serde(skip)]
    pub write_cert: Option<PathBuf>,
    /// UDP address of the QUIC endpoint (port 0 picks a free one).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7337")]
    pub listen: SocketAddr,
    /// Directory for shuffle files and the generated certificate.
    #[arg(long, value_name = "DIR", default_value = "./shuffle-data")]
    pub data_dir: PathBuf,
    /// Memory budget for everything held on behalf of clients: blocks, receive and read buffers, tables.
    #[arg(long, value_name = "SIZE", default_value = "1GiB")]
    pub memory: ByteSize,
    /// The least a spill writes at once when a buffer holds that much; full hybrid spilling writes every flush size.
    #[arg(long, value_name = "SIZE", default_value = "8MiB")]
    pub flush_size: ByteSize,
    /// Free space every write must leave on the data dir's filesystem; otherwise writers get DiskFull.
    #[arg(long, value_name = "SIZE", default_value = "1GiB")]
    pub disk_reserve: ByteSize,
    /// PEM certificate chain (with --key); without, a self-signed one is generated into the data dir.
    #[arg(long, value_name = "FILE", requires = "key")]
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cert: Option<PathBuf>,
    /// PEM private key for --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub key: Option<PathBuf>,
    /// File holding the admission token clients must present (or set SHUFFLE_AUTH_TOKEN).
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub auth_token_file: Option<PathBuf>,
    /// The admission token itself, read from `auth_token_file` or the environment; never a flag.
    #[arg(skip)]
    #[serde(skip)]
    pub auth_token: Option<String>,
    /// Remove an app this long after its last connection closed.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub app_timeout: Duration,
    /// Close a connection that shows no sign of life for this long.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// On SIGTERM, give in-flight requests this long to finish.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Most connections served at once; the QUIC receive windows are sized so that this many fit the budget.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_connections: usize,
    /// Most request streams one connection may have open at once.
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub max_streams_per_connection: u32,
    /// Most apps registered at once.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_apps: usize,
    /// Most shuffles one app may have registered at once.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub max_shuffles_per_app: usize,
    /// TCP address serving /metrics (Prometheus) and /status (JSON), or `off`.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: OptionalAddr,
    /// Unix socket for clients on this host: `auto` (shuffle.sock in the data dir), a path, or `off`.
    #[arg(long, value_name = "PATH", default_value = "auto")]
    pub unix_socket: UnixSocketSetting,
    /// Largest UDP payload QUIC probes up to (1452 for Ethernet; 8952 with jumbo frames).
    #[arg(long, value_name = "BYTES", default_value_t = shuffle_protocol::limits::DEFAULT_MAX_UDP_PAYLOAD)]
    pub max_udp_payload: u16,
    /// How long memory the process freed stays with it for reuse before it goes back to the OS (mimalloc's purge delay).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub memory_return_delay: Duration,
    /// Accept `POST /fault/partition?millis=N` on the admin listener, which cuts this process off the network for N ms (for fault tests; never in production).
    #[arg(long)]
    pub fault_injection: bool,
}

/// Where the server's Unix socket goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnixSocketSetting {
    /// `shuffle.sock` in the data dir.
    Auto,
    /// No socket.
    Off,
    /// This path.
    Path(PathBuf),
}

impl UnixSocketSetting {
    /// The socket's path for a server with `data_dir`, if it has one.
    pub fn path(&self, data_dir: &std::path::Path) -> Option<PathBuf> {
        match self {
            Self::Auto => Some(data_dir.join("shuffle.sock")),
            Self::Off => None,
            Self::Path(p) => Some(p.clone()),
        }
    }
}

impl FromStr for UnixSocketSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.trim() {
            "auto" => Self::Auto,
            "off" => Self::Off,
            "" => return Err("an empty socket path; use auto, off or a path".into()),
            path => Self::Path(PathBuf::from(path)),
        })
    }
}

impl std::fmt::Display for UnixSocketSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Off => f.write_str("off"),
            Self::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

impl Serialize for UnixSocketSetting {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for UnixSocketSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Default for ServerConfig {
    /// The command line's defaults, with no metrics listener: a server
    /// embedded as a library opens no extra port unless asked.
    fn default() -> Self {
        let mut config = Self::parse_from(["shuffle-server"]);
        config.metrics_addr = OptionalAddr(None);
        config
    }
}

impl ServerConfig {
    /// The configuration from command-line `args` (the program name first),
    /// the file they name with `--config`, and the token's file or environment.
    pub fn load<I, T>(args: I) -> Result<Self, ServerError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Self::command().try_get_matches_from(args).map_err(|e| ServerError::Usage(Box::new(e)))?;
        let mut config = Self::from_arg_matches(&matches).map_err(|e| ServerError::Usage(Box::new(e)))?;
        if let Some(path) = config.config.clone() {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ServerError::Config(format!("cannot read {}: {e}", path.display())))?;
            let file: toml::Table =
                toml::from_str(&text).map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))?;
            let mut merged = toml::Table::try_from(&config).map_err(|e| ServerError::Config(e.to_string()))?;
            for (key, value) in file {
                // Only known keys have a source; unknown ones are refused when the merge is read back.
                let source = matches.try_get_raw(&key).ok().flatten().and_then(|_| matches.value_source(&key));
                let from_command_line = matches!(source, Some(ValueSource::CommandLine | ValueSource::EnvVariable));
                if !from_command_line {
                    merged.insert(key, value);
                }
            }
            config = merged
                .try_into()
                .map_err(|e: toml::de::Error| ServerError::Config(format!("{}: {e}", path.display())))?;
            config.config = Some(path);
        }
        config.auth_token = match &config.auth_token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        ServerError::Config(format!("cannot read the auth token file {}: {e}", path.display()))
                    })?
                    .trim()
                    .to_string(),
            ),
            None => std::env::var(AUTH_TOKEN_ENV).ok(),
        };
        config.cluster_secret = match &config.cluster_secret_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        ServerError::Config(format!("cannot read the cluster secret file {}: {e}", path.display()))
                    })?
                    .trim()
                    .to_string(),
            ),
            None => std::env::var(CLUSTER_SECRET_ENV).ok(),
        };
        Ok(config)
    }

    /// The address clients and other workers reach this server at.
    pub fn advertised(&self, bound: SocketAddr) -> SocketAddr {
        self.advertise.unwrap_or(bound)
    }

    /// Checks combinations that no single key can get wrong on its own.
    pub fn validate(&self) -> Result<(), ServerError> {
        if self.cert.is_some() != self.key.is_some() {
            return Err(ServerError::Config("--cert and --key must be given together".into()));
        }
        if self.memory.as_u64() < 1 << 20 {
            return Err(ServerError::Config(format!("memory budget {} is below the minimum of 1MiB", self.memory)));
        }
        if self.flush_size.as_u64() == 0 || self.flush_size > self.memory {
            return Err(ServerError::Config(format!(
                "flush_size {} must be above zero and not above the memory budget {}",
                self.flush_size, self.memory
            )));
        }
        if matches!(&self.auth_token, Some(t) if t.is_empty()) {
            return Err(ServerError::Config("the auth token must not be empty".into()));
        }
        if self.role != Role::Standalone {
            match &self.cluster_secret {
                None => {
                    return Err(ServerError::Config(format!(
                        "a {:?} needs the cluster secret its coordinator and workers share: --cluster-secret-file \
                         FILE or {CLUSTER_SECRET_ENV}",
                        self.role
                    )));
                }
                Some(s) if s.len() < 16 => {
                    return Err(ServerError::Config("the cluster secret must be at least 16 characters".into()));
                }
                Some(_) => {}
            }
            if self.cert.is_none() {
                return Err(ServerError::Config(
                    "cluster processes check each other's certificate: give every one the same --cert and --key \
                     (`shuffle-server --write-cert DIR` makes a pair)"
                        .into(),
                ));
            }
            if self.heartbeat_interval.is_zero() || self.worker_timeout < self.heartbeat_interval * 2 {
                return Err(ServerError::Config(format!(
                    "worker_timeout ({:?}) must be at least two heartbeat intervals ({:?})",
                    self.worker_timeout, self.heartbeat_interval
                )));
            }
        }
        if self.role == Role::Worker {
            if self.coordinator.is_empty() {
                return Err(ServerError::Config("a worker needs --coordinator ADDR[,ADDR]".into()));
            }
            if let Some(id) = &self.worker_id {
                shuffle_protocol::cluster::validate_worker_id(id).map_err(ServerError::Config)?;
            }
            if self.advertised(self.listen).ip().is_unspecified() {
                return Err(ServerError::Config(format!(
                    "a worker listening on {} must say where it is reached: --advertise ADDR",
                    self.listen
                )));
            }
        } else if !self.coordinator.is_empty() {
            return Err(ServerError::Config(format!("--coordinator is for workers, not a {:?}", self.role)));
        }
        for (what, n) in [
            ("max_connections", self.max_connections),
            ("max_streams_per_connection", self.max_streams_per_connection as usize),
            ("max_apps", self.max_apps),
            ("max_shuffles_per_app", self.max_shuffles_per_app),
        ] {
            if n == 0 {
                return Err(ServerError::Config(format!("{what} must be at least 1")));
            }
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

impl std::fmt::Display for OptionalAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("off"),
        }
    }
}

impl Serialize for OptionalAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for OptionalAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_file_and_the_library_opens_no_metrics_port() {
        let config = ServerConfig::default();
        assert_eq!(config.listen, "127.0.0.1:7337".parse().unwrap());
        assert_eq!(config.memory, ByteSize::gib(1));
        assert_eq!(config.app_timeout, Duration::from_secs(300));
        assert_eq!(config.metrics_addr, OptionalAddr(None));
        let cli = ServerConfig::load(["shuffle-server"]).unwrap();
        assert_eq!(cli.metrics_addr.0, Some(DEFAULT_METRICS_ADDR.parse().unwrap()));
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(
            &path,
            "listen = \"0.0.0.0:9000\"\nmemory = \"512MiB\"\ndata_dir = \"/tmp/x\"\napp_timeout = \"10s\"\n",
        )
        .unwrap();
        let config =
            ServerConfig::load(["shuffle-server", "--config", path.to_str().unwrap(), "--memory", "2GiB"]).unwrap();
        assert_eq!(config.listen, "0.0.0.0:9000".parse().unwrap(), "from the file");
        assert_eq!(config.memory, ByteSize::gib(2), "the flag wins");
        assert_eq!(config.app_timeout, Duration::from_secs(10));
        assert_eq!(config.flush_size, ByteSize::mib(8), "a default");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(&path, "memroy = \"1GiB\"\n").unwrap();
        let err = ServerConfig::load(["shuffle-server", "--config", path.to_str().unwrap()]).unwrap_err();
        assert!(err.to_string().contains("memroy"), "{err}");
        std::fs::write(&path, "app_timeout = \"5 fortnights\"\n").unwrap();
        let err = ServerConfig::load(["shuffle-server", "--config", path.to_str().unwrap()]).unwrap_err();
        assert!(err.to_string().contains("server.toml"), "{err}");
        assert!(ServerConfig::load(["shuffle-server", "--memory", "12 parsecs"]).is_err());
    }

    #[test]
    fn the_token_comes_from_its_file_never_from_argv() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let config = ServerConfig::load(["shuffle-server", "--auth-token-file", path.to_str().unwrap()]).unwrap();
        assert_eq!(config.auth_token.as_deref(), Some("s3cret"));
        assert!(ServerConfig::load(["shuffle-server", "--auth-token", "x"]).is_err());
    }
}
