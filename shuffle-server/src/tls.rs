//! TLS material for the QUIC endpoint: a certificate and key from the
//! configuration, or a self-signed pair generated into the data dir on first
//! start and reused after, which clients trust by path.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::{ServerConfig, ServerError};

/// ALPN protocol id of the shuffle protocol, version 1.
pub const ALPN: &[u8] = b"shuffle/1";

/// The certificate chain and key the endpoint presents, and where the certificate lives.
pub struct TlsMaterial {
    /// Certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// The PEM file holding the certificate, for clients to trust.
    pub cert_path: PathBuf,
}

impl TlsMaterial {
    /// Loads the configured pair, or the generated one under the data dir (generating it if absent).
    pub fn load_or_generate(config: &ServerConfig) -> Result<Self, ServerError> {
        let (cert_path, key_path) = match (&config.cert, &config.key) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => {
                let dir = config.data_dir.join("tls");
                let paths = (dir.join("cert.pem"), dir.join("key.pem"));
                if !paths.0.exists() || !paths.1.exists() {
                    generate_self_signed(&dir, &paths.0, &paths.1)?;
                }
                paths
            }
        };
        let tls_err = |path: &Path, e: &dyn std::fmt::Display| ServerError::Tls(format!("{}: {e}", path.display()));
        let chain = CertificateDer::pem_file_iter(&cert_path)
            .map_err(|e| tls_err(&cert_path, &e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tls_err(&cert_path, &e))?;
        if chain.is_empty() {
            return Err(tls_err(&cert_path, &"no certificate in file"));
        }
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| tls_err(&key_path, &e))?;
        Ok(Self { chain, key, cert_path })
    }

    /// The QUIC server crypto configuration: TLS 1.3 only, with our ALPN.
    pub fn quic_server_config(self) -> Result<quinn::crypto::rustls::QuicServerConfig, ServerError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ServerError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(self.chain, self.key)
            .map_err(|e| ServerError::Tls(format!("certificate and key do not fit together: {e}")))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.max_early_data_size = 0;
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| ServerError::Tls(e.to_string()))
    }
}

/// Writes a self-signed certificate for `localhost`, `127.0.0.1` and `::1`.
fn generate_self_signed(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<(), ServerError> {
    write_self_signed(dir, cert_path, key_path, "localhost")
}

/// Writes a self-signed certificate for `name` (and the loopback
/// addresses) with its key into `dir` as `cert.pem` and `key.pem`, for
/// every process of a cluster to share (`shuffle-server --write-cert DIR`).
pub fn write_cluster_cert(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), ServerError> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    write_self_signed(dir, &cert, &key, name)?;
    Ok((cert, key))
}

fn write_self_signed(dir: &Path, cert_path: &Path, key_path: &Path, name: &str) -> Result<(), ServerError> {
    let io = |path: &Path, e: std::io::Error| ServerError::Io(format!("{}: {e}", path.display()));
    fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut names = vec![name.to_string(), "localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    names.dedup();
    let certified = rcgen::generate_simple_self_signed(names).map_err(|e| ServerError::Tls(e.to_string()))?;
    // Write the key first and the certificate last, so a crash in between
    // leaves no certificate without its key.
    fs::write(key_path, certified.signing_key.serialize_pem()).map_err(|e| io(key_path, e))?;
    restrict_permissions(key_path).map_err(|e| io(key_path, e))?;
    fs::write(cert_path, certified.cert.pem()).map_err(|e| io(cert_path, e))?;
    tracing::info!(cert = %cert_path.display(), "generated a self-signed certificate");
    Ok(())
}

fn restrict_permissions(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
}
