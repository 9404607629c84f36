//! Establishing a transport: QUIC first, TCP+TLS raced after a head start or as soon as QUIC
//! fails, the winner kept. A network where QUIC lost is remembered for a while and goes straight
//! to TCP.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::debug;

use super::{ClientConfig, ClientError, TransportPreference};
use crate::protocol::Transport;

/// A byte stream in both directions: a QUIC bidirectional stream or a TLS connection.
pub trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

/// An established transport carrying one session.
pub(crate) struct Connected {
    pub stream: Box<dyn Duplex>,
    pub transport: Transport,
    /// Kept so the QUIC connection can be closed explicitly with a reason.
    pub quic: Option<quinn::Connection>,
}

impl Connected {
    pub fn close(self) {
        if let Some(conn) = self.quic {
            conn.close(0u32.into(), b"client closing");
        }
    }
}

/// The TLS client configuration both transports use: TLS 1.3 only, ALPN `vane/1`. It trusts the
/// certificates in `ca_pem` and nothing else (a private CA, such as the server's `tls/ca.pem`),
/// or, when `ca_pem` is empty, the platform's trust store: the OS verifier on Android, iOS and
/// macOS, the system's CA bundle elsewhere (`SSL_CERT_FILE`/`SSL_CERT_DIR` honoured).
pub fn tls_config(ca_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(crypto_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(format!("TLS: {e}")))?;
    let mut tls = if ca_pem.is_empty() {
        use rustls_platform_verifier::BuilderVerifierExt;
        builder
            .with_platform_verifier()
            .map_err(|e| ClientError::Config(format!("the platform's trust store: {e}")))?
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| ClientError::Config(format!("CA PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| ClientError::Config(format!("CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(ClientError::Config("CA PEM holds no certificate".into()));
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    tls.alpn_protocols = vec![vane_proto::ALPN.to_vec()];
    Ok(Arc::new(tls))
}

/// *ring*'s cryptography cut to what a client of this protocol needs, for the mobile library's
/// size (docs/BENCHMARKS.md): the TLS 1.3 suites; P-256 key exchange only (RFC 8446 makes it
/// the one group every TLS 1.3 server must support; X25519 would add 33 KB); the signature
/// checks of public CAs' chains (ECDSA P-256/P-384, RSA), not Ed25519 certificates, which
/// public CAs do not issue and browsers do not accept (13 KB); and no signing keys, since a
/// client never authenticates with a certificate (`default_provider()` links RSA and ECDSA
/// signing).
fn crypto_provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::{cipher_suite, kx_group};
    rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
        ],
        kx_groups: vec![kx_group::SECP256R1],
        signature_verification_algorithms: SIGNATURE_ALGORITHMS,
        secure_random: &OsRandom,
        key_provider: &NoSigningKeys,
    }
}

/// The signature checks *ring* offers through webpki, as rustls' own *ring* provider lists them,
/// without Ed25519.
static SIGNATURE_ALGORITHMS: rustls::crypto::WebPkiSupportedAlgorithms = {
    use rustls::SignatureScheme as S;
    use webpki::ring as alg;
    rustls::crypto::WebPkiSupportedAlgorithms {
        all: &[
            alg::ECDSA_P256_SHA256,
            alg::ECDSA_P256_SHA384,
            alg::ECDSA_P384_SHA256,
            alg::ECDSA_P384_SHA384,
            alg::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
            alg::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
            alg::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
            alg::RSA_PKCS1_2048_8192_SHA256,
            alg::RSA_PKCS1_2048_8192_SHA384,
            alg::RSA_PKCS1_2048_8192_SHA512,
            alg::RSA_PKCS1_2048_8192_SHA256_ABSENT_PARAMS,
            alg::RSA_PKCS1_2048_8192_SHA384_ABSENT_PARAMS,
            alg::RSA_PKCS1_2048_8192_SHA512_ABSENT_PARAMS,
        ],
        mapping: &[
            (
                S::ECDSA_NISTP384_SHA384,
                &[alg::ECDSA_P384_SHA384, alg::ECDSA_P256_SHA384],
            ),
            (
                S::ECDSA_NISTP256_SHA256,
                &[alg::ECDSA_P256_SHA256, alg::ECDSA_P384_SHA256],
            ),
            (
                S::RSA_PSS_SHA512,
                &[alg::RSA_PSS_2048_8192_SHA512_LEGACY_KEY],
            ),
            (
                S::RSA_PSS_SHA384,
                &[alg::RSA_PSS_2048_8192_SHA384_LEGACY_KEY],
            ),
            (
                S::RSA_PSS_SHA256,
                &[alg::RSA_PSS_2048_8192_SHA256_LEGACY_KEY],
            ),
            (S::RSA_PKCS1_SHA512, &[alg::RSA_PKCS1_2048_8192_SHA512]),
            (S::RSA_PKCS1_SHA384, &[alg::RSA_PKCS1_2048_8192_SHA384]),
            (S::RSA_PKCS1_SHA256, &[alg::RSA_PKCS1_2048_8192_SHA256]),
        ],
    }
};

/// Randomness from the operating system, as rustls' own *ring* provider draws it.
#[derive(Debug)]
struct OsRandom;

impl rustls::crypto::SecureRandom for OsRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), rustls::crypto::GetRandomFailed> {
        use ring::rand::SecureRandom;
        ring::rand::SystemRandom::new()
            .fill(buf)
            .map_err(|_| rustls::crypto::GetRandomFailed)
    }
}

/// Refuses every private key: the client has none to load.
#[derive(Debug)]
struct NoSigningKeys;

impl rustls::crypto::KeyProvider for NoSigningKeys {
    fn load_private_key(
        &self,
        _key: rustls::pki_types::PrivateKeyDer<'static>,
    ) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
        Err(rustls::Error::General(
            "the Vane client authenticates with its SDK key, not a certificate".into(),
        ))
    }
}

/// Dials the server. Holds the TLS configuration and the QUIC endpoints, made once per client.
pub(crate) struct Connector {
    endpoint: String,
    server_name: ServerName<'static>,
    preference: TransportPreference,
    head_start: Duration,
    connect_timeout: Duration,
    quic_retry_after: Duration,
    tls: Arc<rustls::ClientConfig>,
    quic_config: quinn::ClientConfig,
    /// One UDP socket per address family, bound on first use.
    quic_v4: Option<quinn::Endpoint>,
    quic_v6: Option<quinn::Endpoint>,
    quic_broken_until: Option<Instant>,
}

impl Connector {
    pub fn new(config: &ClientConfig) -> Result<Connector, ClientError> {
        let host = host_of(&config.endpoint)?;
        let name = config
            .server_name
            .clone()
            .unwrap_or_else(|| host.to_owned());
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| ClientError::Config(format!("server name {name:?}: {e}")))?;

        let tls = tls_config(&config.ca_pem)?;

        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls.clone())
            .map_err(|e| ClientError::Config(format!("QUIC TLS: {e}")))?;
        let mut quic_config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        // Liveness is the protocol's Ping; this only reaps connections nobody noticed were gone.
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_secs(120)).expect("in range"),
        ));
        quic_config.transport_config(Arc::new(transport));

        Ok(Connector {
            endpoint: config.endpoint.clone(),
            server_name,
            preference: config.transport,
            head_start: config.quic_head_start,
            connect_timeout: config.connect_timeout,
            quic_retry_after: config.quic_retry_after,
            tls,
            quic_config,
            quic_v4: None,
            quic_v6: None,
            quic_broken_until: None,
        })
    }

    /// A poller of the server's HTTP listener at `base`, with this connector's TLS settings.
    pub(crate) fn poller(&self, base: &str, sdk_key: &str) -> Result<super::poll::Poller, String> {
        super::poll::Poller::new(base, &self.tls, &self.server_name, sdk_key)
    }

    /// Connects by the configured preference. The error says what each transport did.
    pub async fn connect(&mut self) -> Result<Connected, String> {
        let addr = tokio::net::lookup_host(&self.endpoint)
            .await
            .map_err(|e| format!("resolving {}: {e}", self.endpoint))?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", self.endpoint))?;
        let quic_usable = self.quic_broken_until.is_none_or(|t| Instant::now() >= t);
        let use_quic = match self.preference {
            TransportPreference::Tcp => false,
            TransportPreference::Quic => true,
            TransportPreference::Auto => quic_usable,
        };
        let quic = if use_quic {
            Some(self.quic_endpoint(addr)?)
        } else {
            None
        };
        let dial = Dial {
            addr,
            connector: self,
        };
        let (result, quic_lost) = match (self.preference, quic) {
            (TransportPreference::Tcp, _) | (_, None) => (dial.tcp().await, false),
            (TransportPreference::Quic, Some(ep)) => (dial.quic(&ep).await, false),
            (TransportPreference::Auto, Some(ep)) => dial.race(&ep).await,
        };
        if quic_lost {
            debug!(until = ?self.quic_retry_after, "QUIC lost the race; using TCP for a while");
            self.quic_broken_until = Some(Instant::now() + self.quic_retry_after);
        }
        result
    }

    fn quic_endpoint(&mut self, addr: SocketAddr) -> Result<quinn::Endpoint, String> {
        let (slot, bind): (_, SocketAddr) = if addr.is_ipv4() {
            (
                &mut self.quic_v4,
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            )
        } else {
            (
                &mut self.quic_v6,
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            )
        };
        if let Some(ep) = slot {
            return Ok(ep.clone());
        }
        let mut ep =
            quinn::Endpoint::client(bind).map_err(|e| format!("binding UDP socket: {e}"))?;
        ep.set_default_client_config(self.quic_config.clone());
        *slot = Some(ep.clone());
        Ok(ep)
    }
}

/// One connection attempt's borrowed view of the connector.
struct Dial<'a> {
    addr: SocketAddr,
    connector: &'a Connector,
}

impl Dial<'_> {
    /// QUIC with a head start; TCP joins after it, or at once if QUIC fails. Returns the winner
    /// and whether TCP won while QUIC was tried.
    async fn race(&self, ep: &quinn::Endpoint) -> (Result<Connected, String>, bool) {
        let mut quic = pin!(self.quic(ep));
        let head_start = tokio::time::sleep(self.connector.head_start);
        tokio::select! {
            r = &mut quic => match r {
                Ok(c) => return (Ok(c), false),
                Err(quic_err) => {
                    let tcp = self.tcp().await;
                    let lost = tcp.is_ok();
                    return (tcp.map_err(|tcp_err| format!("quic: {quic_err}; tcp: {tcp_err}")), lost);
                }
            },
            _ = head_start => {}
        }
        let mut tcp = pin!(self.tcp());
        let (mut quic_err, mut tcp_err) = (None, None);
        loop {
            tokio::select! {
                r = &mut quic, if quic_err.is_none() => match r {
                    Ok(c) => return (Ok(c), false),
                    Err(e) => quic_err = Some(e),
                },
                r = &mut tcp, if tcp_err.is_none() => match r {
                    Ok(c) => return (Ok(c), true),
                    Err(e) => tcp_err = Some(e),
                },
            }
            if let (Some(q), Some(t)) = (&quic_err, &tcp_err) {
                return (Err(format!("quic: {q}; tcp: {t}")), false);
            }
        }
    }

    async fn quic(&self, ep: &quinn::Endpoint) -> Result<Connected, String> {
        let name = server_name_str(&self.connector.server_name);
        let attempt = async {
            let connecting = ep.connect(self.addr, &name).map_err(|e| e.to_string())?;
            let conn = connecting.await.map_err(|e| e.to_string())?;
            let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            Ok(Connected {
                stream: Box::new(tokio::io::join(recv, send)),
                transport: Transport::Quic,
                quic: Some(conn),
            })
        };
        tokio::time::timeout(self.connector.connect_timeout, attempt)
            .await
            .map_err(|_| {
                format!(
                    "no QUIC handshake within {:?}",
                    self.connector.connect_timeout
                )
            })?
    }

    async fn tcp(&self) -> Result<Connected, String> {
        let attempt = async {
            let tcp = TcpStream::connect(self.addr)
                .await
                .map_err(|e| e.to_string())?;
            tcp.set_nodelay(true).map_err(|e| e.to_string())?;
            let tls = tokio_rustls::TlsConnector::from(self.connector.tls.clone())
                .connect(self.connector.server_name.clone(), tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            if tls.get_ref().1.alpn_protocol() != Some(vane_proto::ALPN) {
                return Err("server did not agree on ALPN vane/1".to_owned());
            }
            Ok(Connected {
                stream: Box::new(tls),
                transport: Transport::Tcp,
                quic: None,
            })
        };
        tokio::time::timeout(self.connector.connect_timeout, attempt)
            .await
            .map_err(|_| {
                format!(
                    "no TLS handshake within {:?}",
                    self.connector.connect_timeout
                )
            })?
    }
}

fn server_name_str(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(d) => d.as_ref().to_owned(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

/// The host part of `host:port` or `[v6]:port`.
fn host_of(endpoint: &str) -> Result<&str, ClientError> {
    let bad = || ClientError::Config(format!("endpoint {endpoint:?} is not HOST:PORT"));
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        Err(bad())
    } else {
        Ok(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_hosts() {
        assert_eq!(host_of("127.0.0.1:7443").unwrap(), "127.0.0.1");
        assert_eq!(host_of("[::1]:7443").unwrap(), "::1");
        assert_eq!(
            host_of("flags.example.com:443").unwrap(),
            "flags.example.com"
        );
        assert!(host_of("nohost").is_err());
        assert!(host_of(":7443").is_err());
        assert!(host_of("h:notaport").is_err());
    }
}
