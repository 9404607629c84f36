//! TLS material in the data directory. On first start the server makes a private CA
//! (`tls/ca.pem`, the file clients trust) and a certificate it signs for `localhost`, the
//! loopback addresses and this host's name (`tls/cert.pem` with `tls/key.pem`). The CA's private
//! key is not kept: nothing else can be issued under it. Operators may replace `cert.pem` and
//! `key.pem` with their own; they are read on every start.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What happened.
        source: io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Certificate generation failed.
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificate or key.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes a file readable only by its owner.
pub fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

/// Makes sure `dir/tls` holds a CA, a certificate and a key; returns whether they were created.
pub fn ensure(dir: &Path) -> Result<bool, TlsError> {
    let tls = dir.join("tls");
    let (cert, key) = (tls.join("cert.pem"), tls.join("key.pem"));
    if cert.exists() && key.exists() {
        return Ok(false);
    }
    fs::create_dir_all(&tls).map_err(io_err(&tls))?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Vane local CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if let Ok(host) = fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() && host != "localhost" {
            names.push(host.to_owned());
        }
    }
    let mut leaf_params = CertificateParams::new(names)?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "vane server");
    let leaf_key = KeyPair::generate()?;
    let leaf = leaf_params.signed_by(&leaf_key, &issuer)?;

    let ca_path = tls.join("ca.pem");
    fs::write(&ca_path, ca_cert.pem()).map_err(io_err(&ca_path))?;
    let chain = format!("{}{}", leaf.pem(), ca_cert.pem());
    fs::write(&cert, chain).map_err(io_err(&cert))?;
    write_private(&key, leaf_key.serialize_pem().as_bytes()).map_err(io_err(&key))?;
    Ok(true)
}

/// Where the data directory `dir` keeps the PEM clients trust.
pub fn ca_path(dir: &Path) -> std::path::PathBuf {
    dir.join("tls").join("ca.pem")
}

/// The rustls server configuration for both transports: TLS 1.3, ALPN `vane/1`.
pub fn server_config(dir: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let tls = dir.join("tls");
    let (cert_path, key_path) = (tls.join("cert.pem"), tls.join("key.pem"));
    let pem_err = |path: &Path, message: String| TlsError::Pem {
        path: path.display().to_string(),
        message,
    };
    let cert_pem = fs::read(&cert_path).map_err(io_err(&cert_path))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(&cert_path, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_err(&cert_path, "no certificate found".into()));
    }
    let key_pem = fs::read(&key_path).map_err(io_err(&key_path))?;
    let key =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_err(&key_path, e.to_string()))?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![vane_proto::ALPN.to_vec()];
    Ok(Arc::new(config))
}
