//! Binding and running the server: `Server::bind` prepares the data directory and opens every
//! socket (so callers learn the addresses, including ephemeral ports); `Server::run` serves until
//! the shutdown future resolves, then drains sessions with GoAway and closes the store.

use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use vane_core::protocol::Transport;

use crate::control::Control;
use crate::control::ControlConfig;
use crate::events::{Events, EventsConfig};
use crate::http::HttpLimits;
use crate::hub::Hub;
use crate::limits::{self, Handshake, Limits, LimitsConfig, Refused, Source};
use crate::session::{Refusal, SessionConfig, driver};
use crate::store::Store;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::{http, quic, tls, tls_stream};

/// Everything `vane serve` can be told.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Holds `vane.db`, `tls/` and `admin-token`.
    pub data_dir: PathBuf,
    /// A PostgreSQL URL (`postgres://user@host:port/db`) to keep the state in, shared by
    /// several nodes; `None`: the embedded SQLite file `vane.db` in the data directory.
    pub store_url: Option<String>,
    /// The protocol address: TLS on TCP and QUIC on UDP, same port.
    pub listen: SocketAddr,
    /// The HTTP address (admin API, SDK endpoints, health, metrics).
    pub http: SocketAddr,
    /// Whether to serve QUIC as well as TCP+TLS.
    pub quic: bool,
    /// Whether the HTTP listener speaks HTTPS, with the protocol listener's certificate (for
    /// OFREP and polling clients that cross networks).
    pub http_tls: bool,
    /// Changes kept per environment for resumption by delta.
    pub history_window: usize,
    /// Most concurrent protocol connections; more are refused.
    pub max_connections: usize,
    /// Connections the kernel queues for the TCP listener before the server accepts them. A
    /// reconnect storm arrives at once, so this is large; the kernel caps it at
    /// `net.core.somaxconn`.
    pub listen_backlog: u32,
    /// How long shutdown waits for sessions to leave after GoAway.
    pub drain_timeout: Duration,
    /// Create the `demo` environment with a few flags and a server key.
    pub demo: bool,
    /// Limits of the HTTP listener.
    pub http_limits: HttpLimits,
    /// What one source address may ask: connection rate, handshakes, wrong admin tokens.
    pub limits: LimitsConfig,
    /// Evaluation events and their exporters.
    pub events: EventsConfig,
    /// Per-session settings.
    pub session: SessionConfig,
    /// Clone batches, change-log retention.
    pub control: ControlConfig,
    /// How often the change logs are pruned to their retention.
    pub prune_interval: Duration,
}

impl ServerConfig {
    /// The defaults of `vane serve`, with `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            data_dir: data_dir.into(),
            store_url: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            http: SocketAddr::from(([127, 0, 0, 1], 7480)),
            quic: true,
            http_tls: false,
            history_window: 1000,
            max_connections: 100_000,
            listen_backlog: default_backlog(),
            drain_timeout: Duration::from_secs(10),
            demo: false,
            http_limits: HttpLimits::default(),
            limits: LimitsConfig::default(),
            events: EventsConfig::default(),
            session: SessionConfig::default(),
            control: ControlConfig::default(),
            prune_interval: Duration::from_secs(300),
        }
    }
}

/// A bound server, ready to [`Server::run`].
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    control: Arc<Control>,
    tls: Arc<rustls::ServerConfig>,
    protocol: Protocol,
    http: TcpListener,
    admin_token: String,
    created_token: bool,
    /// The data directory's lasting secret (`quic-reset-key`).
    secret: [u8; 32],
}

/// What a TLS connection that negotiated no ALPN is told, instead of getting a session.
const NO_ALPN: Refusal = Refusal {
    code: vane_proto::v1::ErrorCode::ProtocolViolation,
    message: "this connection did not negotiate ALPN vane/1 (docs/PROTOCOL.md section 1)",
    retry_after_ms: 0,
};

/// What a connection from a source over its connection rate is told, once its handshake is
/// done, with when to come back.
fn rate_limited(wait: Duration) -> Refusal {
    Refusal {
        code: vane_proto::v1::ErrorCode::RateLimited,
        message: "too many connections from this address; retry after retry_after_ms",
        retry_after_ms: u32::try_from(limits::retry_after(wait).as_millis()).unwrap_or(u32::MAX),
    }
}

/// What sessions share.
#[derive(Debug)]
pub(crate) struct Ctx {
    hub: Arc<Hub>,
    session: Arc<SessionConfig>,
    shutdown: CancellationToken,
    slots: Arc<Semaphore>,
    limits: Arc<Limits>,
    tracker: TaskTracker,
}

impl Ctx {
    /// What the sessions of `hub` share, cancelled by `shutdown`.
    pub(crate) fn new(
        hub: Arc<Hub>,
        session: SessionConfig,
        shutdown: CancellationToken,
        max_connections: usize,
        limits: LimitsConfig,
    ) -> Arc<Ctx> {
        Arc::new(Ctx {
            hub,
            session: Arc::new(session),
            shutdown,
            slots: Arc::new(Semaphore::new(max_connections)),
            limits: Limits::new(limits),
            tracker: TaskTracker::new(),
        })
    }

    /// The per-source limits.
    pub(crate) fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }

    /// The refusal for a connection that came over its source's rate, counted and logged.
    fn over_rate(&self, rate: Result<(), Duration>, peer: SocketAddr) -> Option<Refusal> {
        let wait = rate.err()?;
        self.limits.refused(Refused::ConnectRate, peer);
        Some(rate_limited(wait))
    }

    async fn run_session<S>(&self, stream: &mut S, transport: Transport, refusal: Option<Refusal>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let (hub, config, stop) = (&self.hub, &self.session, &self.shutdown);
        driver::run(stream, transport, hub, config, stop, refusal).await
    }
}

/// The protocol listeners, TLS over TCP and QUIC on one port, bound: what `vane serve` and
/// `vane relay` serve sessions on.
#[derive(Debug)]
pub(crate) struct Protocol {
    tcp: TcpListener,
    quic: Option<quic::Endpoint>,
}

/// The protocol listeners accepting sessions, until [`Serving::drain`].
#[derive(Debug)]
pub(crate) struct Serving {
    acceptors: TaskTracker,
    quic: Option<(quic::Endpoint, tokio::task::JoinHandle<()>)>,
    ctx: Arc<Ctx>,
}

/// What `vane serve` and `vane relay` bind alike: the data directory prepared (its TLS material,
/// generated on first start, and its lasting secret), the protocol listeners and HTTP.
#[derive(Debug)]
pub(crate) struct Listeners {
    pub(crate) tls: Arc<rustls::ServerConfig>,
    pub(crate) secret: [u8; 32],
    pub(crate) protocol: Protocol,
    pub(crate) http: TcpListener,
}

impl Listeners {
    /// Prepares `dir` and binds `listen` (QUIC too, if `quic`) and `http`.
    pub(crate) async fn bind(
        dir: &Path,
        listen: SocketAddr,
        backlog: u32,
        quic: bool,
        session: &SessionConfig,
        http: SocketAddr,
    ) -> anyhow::Result<Listeners> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating data directory {}", dir.display()))?;
        if tls::ensure(dir)? {
            info!(ca = %tls::ca_path(dir).display(), "generated a private CA and a certificate");
        }
        let tls = tls::server_config(dir)?;
        let secret = lasting_secret(dir)?;
        let quic = quic.then(|| (tls.clone(), secret));
        let protocol = Protocol::bind(listen, backlog, quic, session)?;
        let http = TcpListener::bind(http)
            .await
            .with_context(|| format!("binding HTTP on {http}"))?;
        Ok(Listeners {
            tls,
            secret,
            protocol,
            http,
        })
    }
}

impl Protocol {
    /// Binds `addr` (TCP, and UDP unless `quic` is `None`).
    pub(crate) fn bind(
        addr: SocketAddr,
        backlog: u32,
        quic: Option<(Arc<rustls::ServerConfig>, [u8; 32])>,
        session: &SessionConfig,
    ) -> anyhow::Result<Protocol> {
        let (tcp, quic) = bind_protocol(addr, backlog, quic, session)?;
        Ok(Protocol { tcp, quic })
    }

    /// The bound address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.tcp
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Starts accepting sessions, served from `ctx`'s hub, until its shutdown token fires.
    pub(crate) fn serve(self, tls: Arc<rustls::ServerConfig>, ctx: Arc<Ctx>) -> Serving {
        let acceptors = TaskTracker::new();
        acceptors.spawn(accept_tcp(self.tcp, tls, ctx.clone()));
        let quic = self.quic.map(|endpoint| {
            acceptors.spawn(accept_quic(endpoint.clone(), ctx.clone()));
            (endpoint.clone(), tokio::spawn(endpoint.drive()))
        });
        Serving {
            acceptors,
            quic,
            ctx,
        }
    }
}

impl Serving {
    /// After the shutdown token fired (every session is sent GoAway): waits for the acceptors,
    /// then up to `drain` for the sessions to leave, then for QUIC's connections to close.
    pub(crate) async fn drain(self, drain: Duration) {
        let Serving {
            acceptors,
            quic,
            ctx,
        } = self;
        acceptors.close();
        acceptors.wait().await;
        ctx.tracker.close();
        if timeout(drain, ctx.tracker.wait()).await.is_err() {
            warn!(after = ?drain, "sessions still open after the drain timeout; closing them");
        }
        if let Some((endpoint, driver)) = quic {
            // The driver returns once every connection has closed, bounded by its own wait.
            endpoint.close();
            if let Err(e) = driver.await {
                warn!(error = %e, "QUIC driver task failed");
            }
        }
    }
}

/// The embedded store in `dir`. A directory whose token was made by an earlier start held a
/// server: an empty store there is a lost or damaged database, not a new server.
fn open_sqlite(dir: &std::path::Path, created_token: bool) -> anyhow::Result<SqliteStore> {
    let db = dir.join("vane.db");
    let store =
        SqliteStore::open(&db).with_context(|| format!("opening the store {}", db.display()))?;
    if store.created() && !created_token {
        anyhow::bail!(
            "{} is missing or empty, but this data directory was used before ({} exists): \
             refusing to start with no environments. Restore the database from a backup, \
             or remove {} to start a new server here.",
            db.display(),
            dir.join("admin-token").display(),
            dir.join("admin-token").display()
        );
    }
    Ok(store)
}

impl Server {
    /// Prepares the data directory (database, TLS material, admin token) and binds every socket.
    pub async fn bind(config: ServerConfig) -> anyhow::Result<Server> {
        let dir = &config.data_dir;
        let Listeners {
            tls,
            secret,
            protocol,
            http,
        } = Listeners::bind(
            dir,
            config.listen,
            config.listen_backlog,
            config.quic,
            &config.session,
            config.http,
        )
        .await?;
        let (admin_token, created_token) = admin_token(dir)?;
        let store: Arc<dyn Store> = match &config.store_url {
            None => Arc::new(open_sqlite(dir, created_token)?),
            Some(url) => {
                let store = PostgresStore::connect(url)
                    .await
                    .context("opening the PostgreSQL store")?;
                if store.created() {
                    info!(
                        database = store.target(),
                        "created the schema in PostgreSQL"
                    );
                }
                Arc::new(store)
            }
        };
        let hub = Arc::new(Hub::new(config.history_window));
        let control = Control::with_config(store, hub, config.control);
        Ok(Server {
            config,
            control,
            tls,
            protocol,
            http,
            admin_token,
            created_token,
            secret,
        })
    }

    /// The protocol address (TCP, and UDP when QUIC is on).
    pub fn protocol_addr(&self) -> SocketAddr {
        self.protocol.addr()
    }

    /// The HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The admin API token.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// Whether this start created the admin token (so it should be shown).
    pub fn created_token(&self) -> bool {
        self.created_token
    }

    /// The PEM clients should trust.
    pub fn ca_path(&self) -> PathBuf {
        tls::ca_path(&self.config.data_dir)
    }

    /// Serves until `shutdown` resolves; then every session gets GoAway, listeners close, and
    /// the store is flushed.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Server {
            config,
            control,
            tls,
            protocol,
            http,
            admin_token,
            secret,
            ..
        } = self;
        let cancel = CancellationToken::new();
        let (exporters, stop_events) = (TaskTracker::new(), CancellationToken::new());
        let events = Events::start(&config.events, &exporters, stop_events.clone())?;
        let session = SessionConfig {
            events: events.clone(),
            summary_interval: config.events.summary_interval,
            ..config.session.clone()
        };
        let ctx = Ctx::new(
            control.hub().clone(),
            session,
            cancel.clone(),
            config.max_connections,
            config.limits,
        );
        let per_source = ctx.limits.clone();
        let serving = protocol.serve(tls.clone(), ctx);
        let limits = config.http_limits;
        let app = http::router(
            control.clone(),
            &admin_token,
            limits,
            per_source,
            &secret,
            events,
        );
        let https = config.http_tls.then(|| {
            let mut https = (*tls).clone();
            https.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(https)
        });
        let http_task = tokio::spawn(http::serve::serve(
            http,
            app,
            limits,
            https,
            cancel.clone().cancelled_owned(),
        ));

        // Sessions that arrive before this completes are told INITIALIZING.
        if let Err(e) = control.load().await {
            cancel.cancel();
            return Err(e).context("loading state from the store");
        }
        // With PostgreSQL: what other nodes commit reaches this hub too.
        let follower = match control.follow_others(cancel.clone()).await {
            Ok(follower) => follower,
            Err(e) => {
                cancel.cancel();
                return Err(e).context("following the other nodes");
            }
        };
        info!(
            protocol = %config.listen,
            quic = config.quic,
            envs = control.hub().envs().len(),
            node = control.node(),
            "ready"
        );
        if config.demo {
            crate::demo::seed(&control, &config.data_dir).await?;
        }
        let pruner = tokio::spawn(prune(
            control.clone(),
            config.prune_interval,
            cancel.clone(),
        ));

        shutdown.await;
        info!("shutting down: sending GoAway to every session");
        cancel.cancel();
        serving.drain(config.drain_timeout).await;
        if let Err(e) = http_task.await {
            warn!(error = %e, "HTTP server task failed");
        }
        // The exporters write what they hold (the webhook gets one last attempt).
        stop_events.cancel();
        exporters.close();
        if timeout(config.drain_timeout, exporters.wait())
            .await
            .is_err()
        {
            warn!("evaluation event exporters still busy after the drain timeout");
        }
        let _ = pruner.await;
        if let Some(follower) = follower {
            let _ = follower.await;
        }
        control.close().await.context("closing the store")?;
        info!("stopped");
        Ok(())
    }
}

/// Prunes the change logs to their retention: at the start, then every `every`.
async fn prune(control: Arc<Control>, every: Duration, stop: CancellationToken) {
    loop {
        match control.prune().await {
            Ok(0) => {}
            Ok(n) => info!(entries = n, "pruned the change logs to their retention"),
            Err(e) => warn!(error = %e, "pruning the change logs failed; retrying later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every.max(Duration::from_secs(1))) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Reads `dir/admin-token`, creating it (mode 0600) on first start.
fn admin_token(dir: &Path) -> anyhow::Result<(String, bool)> {
    let path = dir.join("admin-token");
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => Ok((token.trim().to_owned(), false)),
        Ok(_) => anyhow::bail!(
            "{} is empty; delete it to have a new token made",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = crate::keys::mint_admin_token();
            tls::write_private(&path, format!("{token}\n").as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            Ok((token, true))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Reads `dir/quic-reset-key`, creating it (mode 0600) on first start: the server's lasting
/// secret. QUIC stateless resets are made from it, so a client still holding a connection to
/// the process before (killed, or crashed) gets a reset at the first packet it sends, and
/// reconnects at once, rather than waiting for its connection to time out; keys for other
/// purposes (OFREP event-stream tokens) are derived from it.
fn lasting_secret(dir: &Path) -> anyhow::Result<[u8; 32]> {
    let path = dir.join("quic-reset-key");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mut key = [0u8; 32];
            hex::decode_to_slice(text.trim(), &mut key).map_err(|e| {
                anyhow::anyhow!(
                    "{} is damaged ({e}): it must hold 64 hexadecimal digits; delete it to \
                     have a new key made (clients connected before then reconnect by timeout)",
                    path.display()
                )
            })?;
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = rand::random::<[u8; 32]>();
            tls::write_private(&path, format!("{}\n", hex::encode(key)).as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Binds TCP and (optionally) UDP on one port. With port 0, retries until the kernel's choice
/// for TCP is free on UDP too.
fn bind_protocol(
    addr: SocketAddr,
    backlog: u32,
    quic: Option<(Arc<rustls::ServerConfig>, [u8; 32])>,
    session: &SessionConfig,
) -> anyhow::Result<(TcpListener, Option<quic::Endpoint>)> {
    let attempts = if addr.port() == 0 { 50 } else { 1 };
    let mut last_err = None;
    for _ in 0..attempts {
        let std_tcp =
            listen_tcp(addr, backlog).with_context(|| format!("binding TCP on {addr}"))?;
        let port = std_tcp.local_addr()?.port();
        let Some((tls, reset_key)) = &quic else {
            return Ok((TcpListener::from_std(std_tcp)?, None));
        };
        match UdpSocket::bind(SocketAddr::new(addr.ip(), port)) {
            Ok(udp) => {
                grow_receive_buffer(&udp);
                let endpoint = quic_endpoint(udp, tls.clone(), reset_key, session)?;
                return Ok((TcpListener::from_std(std_tcp)?, Some(endpoint)));
            }
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.map_or_else(|| anyhow::anyhow!("no port"), anyhow::Error::from))
        .with_context(|| format!("binding UDP for QUIC on {addr}"))
}

/// The largest backlog the kernel grants (`net.core.somaxconn`, 4096 on current Linux), so a
/// storm of reconnects queues instead of overflowing (the standard library's listener asks 128).
pub(crate) fn default_backlog() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096)
}

/// A non-blocking TCP listener on `addr` with this accept backlog.
fn listen_tcp(addr: SocketAddr, backlog: u32) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Every QUIC connection shares one UDP socket, so a burst (a change fanned out, a reconnect
/// storm) arrives faster than the default receive buffer (~208 KB) holds. Ask for 8 MiB; the
/// kernel caps it at `net.core.rmem_max`, which operators of large fleets should raise.
fn grow_receive_buffer(udp: &UdpSocket) {
    let sock = socket2::SockRef::from(udp);
    let _ = sock.set_recv_buffer_size(8 * 1024 * 1024);
    match sock.recv_buffer_size() {
        Ok(size) if size < 4 * 1024 * 1024 => {
            warn!(
                bytes = size,
                "UDP receive buffer is small for many QUIC clients; raise net.core.rmem_max"
            )
        }
        Ok(size) => debug!(bytes = size, "UDP receive buffer"),
        Err(e) => warn!(error = %e, "cannot read the UDP receive buffer size"),
    }
}

fn quic_endpoint(
    socket: UdpSocket,
    tls: Arc<rustls::ServerConfig>,
    reset_key: &[u8; 32],
    session: &SessionConfig,
) -> anyhow::Result<quic::Endpoint> {
    let crypto = quinn_proto::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn_proto::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn_proto::TransportConfig::default();
    // One bidirectional stream carries the session; the client opens nothing else.
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    // The driver sends one datagram per transmit: Vane's sends are a delta or a Ping, one
    // datagram each; only a snapshot spans several, and it is sent once per connect.
    transport.enable_segmentation_offload(false);
    let idle = session.heartbeat * (vane_core::protocol::MISSED_HEARTBEATS + 1);
    transport.max_idle_timeout(Some(quinn_proto::IdleTimeout::try_from(idle)?));
    config.transport_config(Arc::new(transport));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key);
    // The connection IDs carry a check value the endpoint verifies before it answers a packet
    // for a connection it does not know with a reset; its key must outlive restarts too.
    let tag = ring::hmac::sign(&key, b"vane connection id check");
    let cid_key = u64::from_le_bytes(tag.as_ref()[..8].try_into().expect("a SHA-256 tag"));
    let mut endpoint = quinn_proto::EndpointConfig::new(Arc::new(key));
    endpoint.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    // After a restart every client of the old process sends into the void at about the same
    // time; quinn's default of one reset per 20 ms would answer 50 of them a second and leave
    // the rest to time out. A reset is smaller than the packet it answers, so it amplifies
    // nothing; one per 100 µs bounds what a flood of unknown packets can make the server send.
    endpoint.min_reset_interval(Duration::from_micros(100));
    Ok(quic::Endpoint::new(socket, endpoint, config)?)
}

/// The next connection on `listener` (`what` names it in the log). An accept error, typically
/// running out of file descriptors, is waited out, 5 ms doubling to 1 s, rather than retried in
/// a spin. Cancel-safe.
pub(crate) async fn accept(listener: &TcpListener, what: &str) -> (TcpStream, SocketAddr) {
    let mut backoff = Duration::from_millis(5);
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                warn!(error = %e, ?backoff, "{what} accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn accept_tcp(listener: TcpListener, tls: Arc<rustls::ServerConfig>, ctx: Arc<Ctx>) {
    loop {
        let (sock, peer) = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            accepted = accept(&listener, "protocol") => accepted,
        };
        let source = Source::of(peer.ip());
        // Closed before TLS: a source with this many handshakes open is not finishing them.
        let Some(handshake) = ctx.limits.handshakes.begin(source) else {
            ctx.limits.refused(Refused::Handshakes, peer);
            continue;
        };
        let Ok(slot) = ctx.slots.clone().try_acquire_owned() else {
            ctx.limits.refused(Refused::Capacity, peer);
            continue;
        };
        let rate = ctx.limits.connects.take(source, Instant::now());
        let refusal = ctx.over_rate(rate, peer);
        let (tls, c) = (tls.clone(), ctx.clone());
        ctx.tracker.spawn(async move {
            let _slot = slot;
            serve_tcp(sock, peer, tls, &c, handshake, refusal).await;
        });
    }
}

/// Unsent bytes the kernel may hold for one connection before a write waits. Without a limit a
/// socket takes megabytes that a slow reader will take minutes to drain, and the kernel then
/// wakes the writer only once half of them are gone: a client reading 40 KiB/s was dropped as
/// not reading. With it, what a session writes waits in the session, where the next change
/// replaces it (one merged delta), and a slow reader gets the latest state, not a backlog.
/// Bytes in flight are not limited, so throughput on long paths is not either.
const TCP_UNSENT_LIMIT: u32 = 128 * 1024;

/// Serves one TCP connection: TLS (counted as a handshake of its source until done), then the
/// session, or `refusal` (its source is over its connection rate).
async fn serve_tcp(
    sock: TcpStream,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    ctx: &Ctx,
    handshake: Handshake,
    refusal: Option<Refusal>,
) {
    let _ = sock.set_nodelay(true);
    if let Err(e) = socket2::SockRef::from(&sock).set_tcp_notsent_lowat(TCP_UNSENT_LIMIT) {
        debug!(%peer, error = %e, "cannot limit unsent bytes (TCP_NOTSENT_LOWAT)");
    }
    // The handshake counts for its source until TLS is done (owned by this future, so that
    // the connection's task does not keep its place once the session runs).
    let handshaking = async move {
        let stream = tls_stream::accept(sock, tls).await;
        drop(handshake);
        stream
    };
    let mut stream = match timeout(ctx.session.hello_timeout, handshaking).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => return debug!(%peer, "TLS handshake timed out"),
    };
    // rustls refuses a client that offers only other protocols; one that offers none gets
    // through the handshake, and is told why it gets no session.
    let refusal = if stream.alpn_protocol() != Some(vane_proto::ALPN) {
        Some(NO_ALPN)
    } else {
        refusal
    };
    ctx.run_session(&mut stream, Transport::Tcp, refusal).await;
}

async fn accept_quic(endpoint: quic::Endpoint, ctx: Arc<Ctx>) {
    let limits = &ctx.limits;
    loop {
        let incoming = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
        };
        let (peer, now) = (incoming.remote_address(), Instant::now());
        let source = Source::of(peer.ip());
        // Under load, or from a source over its rate, an address not yet validated is asked
        // to prove itself first: a Retry costs one stateless packet, and a spoofed source
        // never comes back.
        if !incoming.remote_address_validated()
            && (limits.handshakes.in_progress() >= limits.config.quic_retry_above
                || limits.connects.check(source, now).is_err())
        {
            limits.retried();
            incoming.retry();
            continue;
        }
        let Some(handshake) = limits.handshakes.begin(source) else {
            limits.refused(Refused::Handshakes, peer);
            incoming.refuse();
            continue;
        };
        let Ok(slot) = ctx.slots.clone().try_acquire_owned() else {
            limits.refused(Refused::Capacity, peer);
            incoming.refuse();
            continue;
        };
        let refusal = ctx.over_rate(limits.connects.take(source, now), peer);
        let c = ctx.clone();
        ctx.tracker.spawn(async move {
            let _slot = slot;
            serve_quic(incoming, &c, handshake, refusal).await;
        });
    }
}

/// Serves one QUIC connection: the handshake (counted for its source until done), then the
/// session, or `refusal`.
async fn serve_quic(
    incoming: quic::Incoming,
    ctx: &Ctx,
    handshake: Handshake,
    refusal: Option<Refusal>,
) {
    let peer = incoming.remote_address();
    // The handshake and the client opening its stream; dropping this on timeout closes the
    // connection ("no session stream").
    let handshaking = async move {
        let stream = incoming.accept().await;
        drop(handshake);
        stream
    };
    let mut stream = match timeout(ctx.session.hello_timeout, handshaking).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return debug!(%peer, error = %e, "QUIC connection failed before its stream"),
        Err(_) => return debug!(%peer, "no QUIC session stream in time"),
    };
    // QUIC's handshake already refused a client without ALPN vane/1.
    ctx.run_session(&mut stream, Transport::Quic, refusal).await;
    // Dropping the stream hands the connection to the endpoint, which waits (briefly) for the
    // client to read the last frame and close it.
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP connection's task holds this future for as long as the client stays; it is most
    /// of what an idle TLS connection costs (docs/BENCHMARKS.md, memory per idle connection).
    #[tokio::test]
    async fn a_tls_connections_task_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        tls::ensure(dir.path()).unwrap();
        let tls = tls::server_config(dir.path()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (sock, peer) = listener.accept().await.unwrap();
        let ctx = Ctx {
            hub: Arc::new(Hub::new(1)),
            session: Arc::new(SessionConfig::default()),
            shutdown: CancellationToken::new(),
            slots: Arc::new(Semaphore::new(1)),
            limits: Limits::new(LimitsConfig::default()),
            tracker: TaskTracker::new(),
        };
        let handshake = ctx.limits.handshakes.begin(Source::of(peer.ip())).unwrap();
        let task = serve_tcp(sock, peer, tls, &ctx, handshake, None);
        let size = std::mem::size_of_val(&task);
        println!("TLS connection task: {size} bytes");
        // 2,576 bytes before the session became a state machine; 2,384 after; 2,456 with the
        // per-source limits.
        assert!(size <= 2576, "the TLS task grew to {size} bytes");
    }
}
