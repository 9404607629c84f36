//! The engine of `vane-load`: opens N protocol sessions to a running server, makes M flag changes
//! through the admin API, and measures for every session and change the time from the commit
//! (the server's `committed_at_ns`, same host clock) to the delta's arrival.
//!
//! Sessions are deliberately lighter than the Rust client: raw protocol sessions (Hello, then
//! frames, Acks to Pings) sharing one QUIC endpoint (one UDP socket) or one TLS configuration,
//! so one process can hold thousands of them. Every loop is bounded in count and time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
use vane_core::client::Duplex;
use vane_core::wire::FrameReader;
use vane_proto::codec;
use vane_proto::v1::{self as pb, frame::Kind};

/// Which transport the sessions use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadTransport {
    /// QUIC, all sessions on one UDP socket.
    Quic,
    /// TLS over TCP, one socket per session.
    Tcp,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The server's protocol address.
    pub endpoint: SocketAddr,
    /// The server's HTTP base URL, e.g. `http://127.0.0.1:7480`.
    pub http: String,
    /// The admin token.
    pub token: String,
    /// The CA PEM clients trust.
    pub ca_pem: Vec<u8>,
    /// The transport.
    pub transport: LoadTransport,
    /// How many sessions.
    pub clients: usize,
    /// How many changes.
    pub changes: usize,
    /// Pause between changes (so each change is measured on its own).
    pub interval: Duration,
    /// Bound on each phase (connecting, delivering).
    pub timeout: Duration,
    /// The server's process id, for RSS and CPU from /proc (optional).
    pub server_pid: Option<u32>,
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Sessions opened.
    pub clients: usize,
    /// The transport.
    pub transport: LoadTransport,
    /// Changes made.
    pub changes: usize,
    /// Commit-to-applied latency percentiles over every (session, change).
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// The slowest.
    pub max_ms: f64,
    /// (session, change) pairs never delivered within the timeout.
    pub missing: usize,
    /// Server RSS growth from connecting the sessions, per session (needs `server_pid`).
    pub rss_per_conn_bytes: Option<u64>,
    /// Server CPU seconds used during the run (needs `server_pid`).
    pub cpu_s: Option<f64>,
    /// Bytes the sessions received per change per session, during the change phase.
    pub bytes_per_change: f64,
    /// Growth of the kernel's UDP receive-buffer errors during the run (`/proc/net/snmp`).
    pub udp_rcvbuf_errors: u64,
    /// Every latency, in milliseconds, sorted (for plots).
    #[serde(skip)]
    pub latencies_ms: Vec<f64>,
}

/// One session's observations.
#[derive(Debug, Default)]
struct Seen {
    /// (to_version, arrival in Unix ns) for every Delta.
    deltas: Vec<(u64, u128)>,
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

async fn admin(
    http: &reqwest::Client,
    cfg: &LoadConfig,
    method: reqwest::Method,
    path: &str,
    body: Value,
) -> Result<Value, String> {
    let url = format!("{}/api/v1{path}", cfg.http.trim_end_matches('/'));
    let resp = http
        .request(method, &url)
        .bearer_auth(&cfg.token)
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    let v: Value = resp.json().await.map_err(|e| format!("{url}: {e}"))?;
    if status.is_success() {
        Ok(v)
    } else {
        Err(format!("{url}: {status} {v}"))
    }
}

/// Runs the scenario; `progress` receives one-line updates for people.
pub async fn run(
    cfg: LoadConfig,
    progress: &(dyn Fn(String) + Sync),
) -> Result<LoadReport, String> {
    let http = reqwest::Client::new();
    let env = format!("load-{:08x}", rand::random::<u32>());
    admin(
        &http,
        &cfg,
        reqwest::Method::POST,
        "/environments",
        json!({ "name": env }),
    )
    .await?;
    let key = admin(
        &http,
        &cfg,
        reqwest::Method::POST,
        &format!("/environments/{env}/keys"),
        json!({"kind": "server"}),
    )
    .await?["secret"]
        .as_str()
        .ok_or("no secret")?
        .to_owned();
    let flag = json!({"on": true, "variants": {"on": true, "off": false}, "off_variant": "off", "fallthrough": {"variant": "on"}});
    admin(
        &http,
        &cfg,
        reqwest::Method::PUT,
        &format!("/environments/{env}/flags/load"),
        flag,
    )
    .await?;

    let rss_before = cfg.server_pid.and_then(rss_bytes);
    let cpu_before = cfg.server_pid.and_then(cpu_seconds);
    let udp_before = udp_rcvbuf_errors();

    // Connect every session, at most 256 handshakes at a time.
    let tls = vane_core::client::tls_config(&cfg.ca_pem).map_err(|e| e.to_string())?;
    let quic = match cfg.transport {
        LoadTransport::Quic => Some(quic_endpoint(tls.clone(), cfg.endpoint)?),
        LoadTransport::Tcp => None,
    };
    let ready = Arc::new(AtomicUsize::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gate = Arc::new(Semaphore::new(256));
    let seen: Vec<Arc<Mutex<Seen>>> = (0..cfg.clients).map(|_| Arc::default()).collect();
    let mut tasks = Vec::with_capacity(cfg.clients);
    for s in &seen {
        let (cfg, key, tls, quic) = (cfg.clone(), key.clone(), tls.clone(), quic.clone());
        let (ready, bytes, counting, gate, s) = (
            ready.clone(),
            bytes.clone(),
            counting.clone(),
            gate.clone(),
            s.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let stream: Box<dyn Duplex> = {
                let _permit = gate.acquire().await.map_err(|e| e.to_string())?;
                match quic {
                    Some(ep) => {
                        let conn = ep
                            .connect(cfg.endpoint, "localhost")
                            .map_err(|e| e.to_string())?
                            .await
                            .map_err(|e| e.to_string())?;
                        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                        Box::new(tokio::io::join(recv, send))
                    }
                    None => {
                        let tcp = tokio::net::TcpStream::connect(cfg.endpoint)
                            .await
                            .map_err(|e| e.to_string())?;
                        let _ = tcp.set_nodelay(true);
                        let name = rustls::pki_types::ServerName::try_from("localhost")
                            .map_err(|e| e.to_string())?;
                        Box::new(
                            tokio_rustls::TlsConnector::from(tls)
                                .connect(name, tcp)
                                .await
                                .map_err(|e| e.to_string())?,
                        )
                    }
                }
            };
            session(stream, &key, &ready, &bytes, &counting, &s).await
        }));
    }
    let deadline = Instant::now() + cfg.timeout;
    loop {
        let n = ready.load(Ordering::Relaxed);
        progress(format!("connected {n}/{}", cfg.clients));
        if n == cfg.clients {
            break;
        }
        if Instant::now() > deadline || tasks.iter().any(|t| t.is_finished()) {
            let failed = tasks.iter().filter(|t| t.is_finished()).count();
            return Err(format!(
                "only {n} of {} sessions initialized ({failed} ended early)",
                cfg.clients
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let rss_connected = cfg.server_pid.and_then(rss_bytes);

    // Change the flag M times; the server says when each change committed.
    counting.store(true, Ordering::Relaxed);
    let mut committed: HashMap<u64, u128> = HashMap::new();
    for i in 0..cfg.changes {
        let path = format!("/environments/{env}/flags/load/toggle");
        let v = admin(
            &http,
            &cfg,
            reqwest::Method::POST,
            &path,
            json!({ "on": i % 2 == 1 }),
        )
        .await?;
        let version = v["version"].as_u64().ok_or("no version")?;
        let at: u128 = v["committed_at_ns"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or("no committed_at_ns")?;
        committed.insert(version, at);
        progress(format!(
            "change {}/{} (version {version})",
            i + 1,
            cfg.changes
        ));
        tokio::time::sleep(cfg.interval).await;
    }
    let last = committed.keys().copied().max().unwrap_or(0);
    let deadline = Instant::now() + cfg.timeout;
    while Instant::now() < deadline {
        let done = seen
            .iter()
            .filter(|s| s.lock().deltas.iter().any(|(v, _)| *v >= last))
            .count();
        progress(format!(
            "delivered the last change to {done}/{}",
            cfg.clients
        ));
        if done == cfg.clients {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    counting.store(false, Ordering::Relaxed);
    let cpu_after = cfg.server_pid.and_then(cpu_seconds);
    for t in &tasks {
        t.abort();
    }
    if let Some(ep) = &quic {
        ep.close(0u32.into(), b"load done");
    }

    // A change counts as applied by the first delta that reaches its version (a merged delta
    // carries several).
    let mut latencies = Vec::with_capacity(cfg.clients * cfg.changes);
    let mut missing = 0;
    for s in &seen {
        let s = s.lock();
        for (version, at) in &committed {
            match s.deltas.iter().find(|(v, _)| v >= version) {
                Some((_, arrived)) => latencies.push((*arrived as f64 - *at as f64) / 1e6),
                None => missing += 1,
            }
        }
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        if latencies.is_empty() {
            f64::NAN
        } else {
            latencies[((latencies.len() as f64 - 1.0) * p).round() as usize]
        }
    };
    let per_conn = match (rss_before, rss_connected) {
        (Some(a), Some(b)) if cfg.clients > 0 => Some(b.saturating_sub(a) / cfg.clients as u64),
        _ => None,
    };
    Ok(LoadReport {
        clients: cfg.clients,
        transport: cfg.transport,
        changes: cfg.changes,
        p50_ms: pct(0.5),
        p90_ms: pct(0.9),
        p99_ms: pct(0.99),
        max_ms: latencies.last().copied().unwrap_or(f64::NAN),
        missing,
        rss_per_conn_bytes: per_conn,
        cpu_s: cpu_before.zip(cpu_after).map(|(a, b)| b - a),
        bytes_per_change: bytes.load(Ordering::Relaxed) as f64
            / (cfg.changes.max(1) * cfg.clients.max(1)) as f64,
        udp_rcvbuf_errors: udp_rcvbuf_errors().saturating_sub(udp_before),
        latencies_ms: latencies,
    })
}

/// One raw session: Hello, then record every Delta and answer every Ping.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    key: &str,
    ready: &AtomicUsize,
    bytes: &AtomicU64,
    counting: &std::sync::atomic::AtomicBool,
    seen: &Mutex<Seen>,
) -> Result<(), String> {
    let hello: pb::Frame = pb::Hello {
        protocol_version: vane_proto::PROTOCOL_VERSION,
        sdk_key: key.to_owned(),
        sdk_name: "vane-load".into(),
        mode: pb::DeliveryMode::Rules.into(),
        ..Default::default()
    }
    .into();
    stream
        .write_all(&codec::encode(&hello))
        .await
        .map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    let mut reader = FrameReader::new(codec::DEFAULT_MAX_FRAME_LEN);
    let mut initialized = false;
    loop {
        let frame = reader
            .read(&mut stream)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("server closed")?;
        if counting.load(Ordering::Relaxed) {
            bytes.fetch_add(
                (codec::PREFIX_LEN + prost::Message::encoded_len(&frame)) as u64,
                Ordering::Relaxed,
            );
        }
        match frame.kind {
            Some(Kind::Snapshot(_) | Kind::UpToDate(_)) if !initialized => {
                initialized = true;
                ready.fetch_add(1, Ordering::Relaxed);
            }
            Some(Kind::Delta(d)) => seen.lock().deltas.push((d.to_version, now_ns())),
            Some(Kind::Ping(p)) => {
                let ack: pb::Frame = pb::Ack {
                    selector: p.selector,
                }
                .into();
                stream
                    .write_all(&codec::encode(&ack))
                    .await
                    .map_err(|e| e.to_string())?;
                stream.flush().await.map_err(|e| e.to_string())?;
            }
            Some(Kind::Error(e)) => return Err(format!("server error: {}", e.message)),
            _ => {}
        }
    }
}

fn quic_endpoint(
    tls: Arc<rustls::ClientConfig>,
    server: SocketAddr,
) -> Result<quinn::Endpoint, String> {
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .map_err(|e| format!("{e}"))?;
    // All sessions share this socket: give it the largest receive buffer the kernel allows.
    let udp = std::net::UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    let _ = socket2::SockRef::from(&udp).set_recv_buffer_size(8 * 1024 * 1024);
    let runtime = quinn::default_runtime().ok_or("no async runtime")?;
    let mut ep = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, udp, runtime)
        .map_err(|e| e.to_string())?;
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    Ok(ep)
}

/// Resident set size of a process, from /proc/PID/status.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// User plus system CPU seconds of a process, from /proc/PID/stat (clock ticks of 1/100 s).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// The kernel's count of UDP datagrams dropped for a full receive buffer (/proc/net/snmp).
pub fn udp_rcvbuf_errors() -> u64 {
    let Ok(snmp) = std::fs::read_to_string("/proc/net/snmp") else {
        return 0;
    };
    let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
    let (Some(names), Some(values)) = (udp.first(), udp.get(1)) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// The latency CDF as an SVG line chart.
pub fn cdf_svg(report: &LoadReport) -> String {
    let (w, h, pad) = (640.0, 400.0, 50.0);
    let max = report.latencies_ms.last().copied().unwrap_or(1.0).max(1e-3);
    let n = report.latencies_ms.len().max(1) as f64;
    let points: Vec<String> = report
        .latencies_ms
        .iter()
        .enumerate()
        .map(|(i, ms)| {
            let x = pad + ms / max * (w - 2.0 * pad);
            let y = h - pad - (i as f64 + 1.0) / n * (h - 2.0 * pad);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{pad}" y="20">Propagation latency CDF: {clients} {transport:?} clients, {changes} changes (p50 {p50:.1} ms, p99 {p99:.1} ms)</text>
<line x1="{pad}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{bottom}" stroke="black"/>
<text x="{pad}" y="{label_y}">0 ms</text><text x="{right}" y="{label_y}" text-anchor="end">{max:.1} ms</text>
<text x="10" y="{pad}">100%</text><text x="10" y="{bottom}">0%</text>
<polyline fill="none" stroke="#0b5fff" stroke-width="2" points="{points}"/>
</svg>
"##,
        clients = report.clients,
        transport = report.transport,
        changes = report.changes,
        p50 = report.p50_ms,
        p99 = report.p99_ms,
        bottom = h - pad,
        right = w - pad,
        label_y = h - pad + 18.0,
        points = points.join(" "),
    )
}
