//! A fleet: N raw protocol sessions in this process, sharing one QUIC endpoint (one UDP socket)
//! or one TLS configuration. Sessions are lighter than the Rust client (Hello, then frames, Acks
//! to Pings) so one process holds thousands, and they resume like a client does: after a GoAway
//! at a random moment within the window the server gave, after a dropped connection with
//! backoff, always presenting the selector they hold.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use vane_core::client::Duplex;
use vane_core::wire::FrameReader;
use vane_proto::codec;
use vane_proto::v1::{self as pb, frame::Kind};

use super::{LoadTransport, now_ns};

/// Handshakes in flight at once per fleet.
const CONCURRENT_HANDSHAKES: usize = 256;
/// Bound on one connection attempt (QUIC towards a stopped server gets no answer at all).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Reconnection attempts in a row before a session gives up.
const MAX_ATTEMPTS: u32 = 60;

/// What a fleet needs to know: where, how, with which key, how many.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetSpec {
    /// The server's protocol address.
    pub endpoint: SocketAddr,
    /// Other nodes of the same cluster, tried in order when `endpoint` cannot be reached (as a
    /// load balancer or a name with several addresses would send a client elsewhere).
    #[serde(default)]
    pub fallbacks: Vec<SocketAddr>,
    /// The transport.
    pub transport: LoadTransport,
    /// The CA PEM the sessions trust.
    pub ca_pem: String,
    /// The SDK key.
    pub sdk_key: String,
    /// Sessions to open.
    pub clients: usize,
}

/// How a session caught up on one connection: the first frame after Welcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CatchUp {
    /// The whole state: the server could not resume from the selector.
    Snapshot,
    /// The changes since the selector.
    Delta,
    /// Nothing changed since the selector.
    UpToDate,
}

/// One session's observations.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Seen {
    /// (to_version, arrival in Unix ns) of every Delta, catch-up deltas included.
    pub deltas: Vec<(u64, u128)>,
    /// (arrival in Unix ns, how) of every catch-up, the first connection's included.
    pub catch_ups: Vec<(u128, CatchUp)>,
    /// The version the session holds.
    pub version: u64,
}

/// Where a fleet stands, for the coordinator's waits and progress line.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Status {
    /// Sessions that finished their first catch-up.
    pub ready: usize,
    /// Sessions holding at least the asked version.
    pub reached: usize,
    /// Sessions that caught up on a connection made after the asked moment.
    pub resumed: usize,
    /// Sessions that gave up (their task ended).
    pub failed: usize,
    /// Connection attempts so far, the first ones included.
    pub attempts: u64,
}

/// Everything a fleet observed, for the report.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Observations {
    /// Per session.
    pub sessions: Vec<Seen>,
    /// Bytes received while counting was on, length prefixes included.
    pub bytes: u64,
    /// Connection attempts, the first ones included.
    pub attempts: u64,
    /// The first error of a session that gave up, if any did.
    pub first_failure: Option<String>,
}

#[derive(Debug, Default)]
struct Shared {
    ready: AtomicUsize,
    bytes: AtomicU64,
    counting: AtomicBool,
    attempts: AtomicU64,
}

/// A running fleet; dropping it aborts its sessions.
#[derive(Debug)]
pub struct Fleet {
    seen: Vec<Arc<Mutex<Seen>>>,
    tasks: Vec<JoinHandle<Result<(), String>>>,
    shared: Arc<Shared>,
    quic: Option<quinn::Endpoint>,
}

impl Fleet {
    /// Starts every session (handshakes are throttled; see [`Fleet::status`] for progress).
    pub fn start(spec: FleetSpec) -> Result<Fleet, String> {
        let tls =
            vane_core::client::tls_config(spec.ca_pem.as_bytes()).map_err(|e| e.to_string())?;
        let quic = match spec.transport {
            LoadTransport::Quic => Some(quic_endpoint(tls.clone(), spec.endpoint)?),
            LoadTransport::Tcp => None,
        };
        let shared = Arc::new(Shared::default());
        let gate = Arc::new(Semaphore::new(CONCURRENT_HANDSHAKES));
        let seen: Vec<Arc<Mutex<Seen>>> = (0..spec.clients).map(|_| Arc::default()).collect();
        let spec = Arc::new(spec);
        let tasks = seen
            .iter()
            .map(|s| {
                let dialer = Dialer {
                    spec: spec.clone(),
                    tls: tls.clone(),
                    quic: quic.clone(),
                    gate: gate.clone(),
                };
                tokio::spawn(session(dialer, shared.clone(), s.clone()))
            })
            .collect();
        Ok(Fleet {
            seen,
            tasks,
            shared,
            quic,
        })
    }

    /// Its sessions.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether it has none.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Counts sessions at `version` and sessions resumed after `since_ns`.
    pub fn status(&self, version: u64, since_ns: u128) -> Status {
        let (mut reached, mut resumed) = (0, 0);
        for s in &self.seen {
            let s = s.lock();
            reached += usize::from(s.version >= version);
            resumed += usize::from(s.catch_ups.iter().any(|(at, _)| *at > since_ns));
        }
        Status {
            ready: self.shared.ready.load(Ordering::Relaxed),
            reached,
            resumed,
            failed: self.tasks.iter().filter(|t| t.is_finished()).count(),
            attempts: self.shared.attempts.load(Ordering::Relaxed),
        }
    }

    /// Turns byte counting on or off.
    pub fn set_counting(&self, on: bool) {
        self.shared.counting.store(on, Ordering::Relaxed);
    }

    /// Stops every session and returns what they observed.
    pub async fn finish(self) -> Observations {
        let mut first_failure = None;
        for t in self.tasks {
            if t.is_finished() {
                if let Ok(Err(e)) = t.await {
                    first_failure.get_or_insert(e);
                }
            } else {
                t.abort();
            }
        }
        if let Some(ep) = &self.quic {
            ep.close(0u32.into(), b"load done");
        }
        Observations {
            sessions: self.seen.iter().map(|s| s.lock().clone()).collect(),
            bytes: self.shared.bytes.load(Ordering::Relaxed),
            attempts: self.shared.attempts.load(Ordering::Relaxed),
            first_failure,
        }
    }
}

/// What a session needs to open connections.
struct Dialer {
    spec: Arc<FleetSpec>,
    tls: Arc<rustls::ClientConfig>,
    quic: Option<quinn::Endpoint>,
    gate: Arc<Semaphore>,
}

impl Dialer {
    /// A connection to the endpoint, or else to the first fallback that takes one.
    async fn connect(&self) -> Result<Box<dyn Duplex>, String> {
        let _permit = self.gate.acquire().await.map_err(|e| e.to_string())?;
        let mut errors = Vec::new();
        for endpoint in
            std::iter::once(self.spec.endpoint).chain(self.spec.fallbacks.iter().copied())
        {
            match self.connect_to(endpoint).await {
                Ok(stream) => return Ok(stream),
                Err(e) => errors.push(format!("{endpoint}: {e}")),
            }
        }
        Err(errors.join("; "))
    }

    async fn connect_to(&self, endpoint: SocketAddr) -> Result<Box<dyn Duplex>, String> {
        let connecting = async {
            let stream: Box<dyn Duplex> = match &self.quic {
                Some(ep) => {
                    let conn = ep
                        .connect(endpoint, "localhost")
                        .map_err(|e| e.to_string())?
                        .await
                        .map_err(|e| e.to_string())?;
                    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                    Box::new(tokio::io::join(recv, send))
                }
                None => {
                    let tcp = tokio::net::TcpStream::connect(endpoint)
                        .await
                        .map_err(|e| e.to_string())?;
                    let _ = tcp.set_nodelay(true);
                    let name = rustls::pki_types::ServerName::try_from("localhost")
                        .map_err(|e| e.to_string())?;
                    Box::new(
                        tokio_rustls::TlsConnector::from(self.tls.clone())
                            .connect(name, tcp)
                            .await
                            .map_err(|e| e.to_string())?,
                    )
                }
            };
            Ok(stream)
        };
        timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| format!("no connection within {CONNECT_TIMEOUT:?}"))?
    }
}

/// Why a connection ended without the session giving up.
enum Leave {
    /// GoAway: come back at a random moment within this window.
    GoAway(Duration),
    /// The server asked to retry after this long (e.g. still loading).
    RetryAfter(Duration),
    /// The connection broke.
    Dropped(String),
}

/// One session for the whole run: connects, resumes after every GoAway or drop, and gives up
/// only on an error the server says is final or after [`MAX_ATTEMPTS`] failures in a row.
async fn session(
    dialer: Dialer,
    shared: Arc<Shared>,
    seen: Arc<Mutex<Seen>>,
) -> Result<(), String> {
    let mut selector: Option<pb::Selector> = None;
    let mut failures = 0;
    loop {
        shared.attempts.fetch_add(1, Ordering::Relaxed);
        let leave = match dialer.connect().await {
            Ok(stream) => {
                connection(stream, &dialer.spec.sdk_key, &shared, &seen, &mut selector).await?
            }
            Err(e) => Leave::Dropped(e),
        };
        let pause = match leave {
            Leave::GoAway(window) => {
                failures = 0;
                window.mul_f64(rand::random::<f64>())
            }
            Leave::RetryAfter(after) if failures < MAX_ATTEMPTS => {
                failures += 1;
                after
            }
            Leave::RetryAfter(_) => return Err("the server kept asking to retry later".into()),
            Leave::Dropped(e) => {
                // The first connection must work: the server is up when a run starts.
                if selector.is_none() || failures >= MAX_ATTEMPTS {
                    return Err(e);
                }
                failures += 1;
                // 100 ms doubling to 1 s, with jitter so retries do not synchronize.
                let base =
                    Duration::from_millis(100 << failures.min(4)).min(Duration::from_secs(1));
                base.mul_f64(0.5 + rand::random::<f64>() / 2.0)
            }
        };
        tokio::time::sleep(pause).await;
    }
}

/// One connection: Hello with the selector held, then record every catch-up and Delta and
/// answer every Ping, until the server sends GoAway or the connection breaks.
async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    key: &str,
    shared: &Shared,
    seen: &Mutex<Seen>,
    selector: &mut Option<pb::Selector>,
) -> Result<Leave, String> {
    let hello: pb::Frame = pb::Hello {
        protocol_version: vane_proto::PROTOCOL_VERSION,
        sdk_key: key.to_owned(),
        sdk_name: "vane-load".into(),
        mode: pb::DeliveryMode::Rules.into(),
        selector: *selector,
        ..Default::default()
    }
    .into();
    if let Err(e) = write(&mut stream, &hello).await {
        return Ok(Leave::Dropped(e));
    }
    let mut reader = FrameReader::new(codec::DEFAULT_MAX_FRAME_LEN);
    let mut caught_up = false;
    loop {
        let frame = match reader.read(&mut stream).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(Leave::Dropped("server closed the connection".into())),
            Err(e) => return Ok(Leave::Dropped(e.to_string())),
        };
        if shared.counting.load(Ordering::Relaxed) {
            let len = codec::PREFIX_LEN + prost::Message::encoded_len(&frame);
            shared.bytes.fetch_add(len as u64, Ordering::Relaxed);
        }
        let at = now_ns();
        let (held, how) = match frame.kind {
            Some(Kind::Snapshot(s)) => (s.selector, CatchUp::Snapshot),
            Some(Kind::UpToDate(u)) => (u.selector, CatchUp::UpToDate),
            Some(Kind::Delta(d)) => {
                let held = pb::Selector {
                    epoch: d.epoch,
                    version: d.to_version,
                };
                (Some(held), CatchUp::Delta)
            }
            Some(Kind::Ping(p)) => {
                let ack: pb::Frame = pb::Ack {
                    selector: p.selector,
                }
                .into();
                if let Err(e) = write(&mut stream, &ack).await {
                    return Ok(Leave::Dropped(e));
                }
                continue;
            }
            Some(Kind::GoAway(g)) => {
                return Ok(Leave::GoAway(Duration::from_millis(
                    g.reconnect_within_ms.into(),
                )));
            }
            Some(Kind::Error(e)) if e.retry_after_ms > 0 => {
                return Ok(Leave::RetryAfter(Duration::from_millis(
                    e.retry_after_ms.into(),
                )));
            }
            Some(Kind::Error(e)) => return Err(format!("server error: {}", e.message)),
            _ => continue,
        };
        *selector = held.or(*selector);
        let mut s = seen.lock();
        if how == CatchUp::Delta {
            s.deltas.push((selector.map_or(0, |sel| sel.version), at));
        }
        s.version = selector.map_or(0, |sel| sel.version);
        if !caught_up {
            caught_up = true;
            if s.catch_ups.is_empty() {
                shared.ready.fetch_add(1, Ordering::Relaxed);
            }
            s.catch_ups.push((at, how));
        }
    }
}

async fn write<S: AsyncWrite + Unpin>(stream: &mut S, frame: &pb::Frame) -> Result<(), String> {
    stream
        .write_all(&codec::encode(frame))
        .await
        .map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())
}

fn quic_endpoint(
    tls: Arc<rustls::ClientConfig>,
    server: SocketAddr,
) -> Result<quinn::Endpoint, String> {
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let bind = SocketAddr::new(
        if server.is_ipv4() {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        },
        0,
    );
    // All sessions share this socket: give it the largest receive buffer the kernel allows.
    let udp = std::net::UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    let _ = socket2::SockRef::from(&udp).set_recv_buffer_size(8 * 1024 * 1024);
    let runtime = quinn::default_runtime().ok_or("no async runtime")?;
    let mut ep = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, udp, runtime)
        .map_err(|e| e.to_string())?;
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    Ok(ep)
}
