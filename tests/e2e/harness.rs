//! The pieces every end-to-end test uses: a real server on loopback ports with its own data
//! directory and generated certificates, the admin API, real clients, a TCP proxy that can cut
//! live connections, and a raw TLS connection for speaking bad protocol on purpose.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;
use vane_core::client::{Client, ClientConfig, TransportPreference};
use vane_core::model::Flag;
use vane_core::sync::Update;
use vane_server::api::ErrorCode;
use vane_server::api::client::{AdminClient, AdminError};
use vane_server::keys::KeyKind;
use vane_server::server::{Server, ServerConfig};

/// How long a test waits for something that should take milliseconds. A bound on failure,
/// never a timing assertion.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A running server with its own data directory.
pub struct TestServer {
    pub dir: TempDir,
    pub config: ServerConfig,
    pub protocol: SocketAddr,
    pub http: SocketAddr,
    pub token: String,
    pub ca: Vec<u8>,
    /// The admin API, with this server's token.
    pub admin: AdminClient,
    stop: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = ServerConfig::new(dir.path());
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.http = "127.0.0.1:0".parse().unwrap();
        config.session.goaway_window = Duration::from_millis(200);
        config.drain_timeout = Duration::from_secs(5);
        tweak(&mut config);
        let mut server = TestServer {
            dir,
            protocol: config.listen,
            http: config.http,
            config,
            token: String::new(),
            ca: Vec::new(),
            admin: AdminClient::new("http://unbound", ""),
            stop: CancellationToken::new(),
            task: None,
        };
        server.launch().await;
        server
    }

    async fn launch(&mut self) {
        let server = Server::bind(self.config.clone())
            .await
            .expect("server binds");
        self.protocol = server.protocol_addr();
        self.http = server.http_addr();
        self.token = server.admin_token().to_owned();
        self.admin = AdminClient::new(format!("http://{}", self.http), &self.token);
        self.ca = std::fs::read(server.ca_path()).expect("CA written");
        self.stop = CancellationToken::new();
        let stop = self.stop.clone();
        self.task = Some(tokio::spawn(server.run(stop.cancelled_owned())));
        // Ready once the state is loaded.
        tokio::time::timeout(PATIENCE, async {
            while !self.admin.ready().await.unwrap_or(false) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("server became ready");
    }

    /// Stops the server the way SIGTERM does and waits until it has exited.
    pub async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("server stopped in time")
                .expect("server task")
                .expect("server ran cleanly");
        }
    }

    /// A node of a cluster on the PostgreSQL database `store`: `peer`'s certificates (so a
    /// client trusts every node alike, as behind one name), its own data directory and ports,
    /// and a short follow interval.
    pub async fn node(store: &str, peer: Option<&TestServer>) -> TestServer {
        let tls = peer.map(|p| p.dir.path().join("tls"));
        TestServer::start_with(|c| {
            c.store_url = Some(store.to_owned());
            c.control.follow_interval = Duration::from_millis(300);
            if let Some(tls) = tls {
                let to = c.data_dir.join("tls");
                std::fs::create_dir_all(&to).unwrap();
                for file in std::fs::read_dir(&tls).unwrap() {
                    let file = file.unwrap();
                    std::fs::copy(file.path(), to.join(file.file_name())).unwrap();
                }
            }
        })
        .await
    }

    /// Stops and starts again on the same data directory and the same ports.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.config.listen = self.protocol;
        self.config.http = self.http;
        self.launch().await;
    }

    /// Creates `env` and a key of `kind` for it; returns the secret.
    pub async fn env_with_key(&self, env: &str, kind: KeyKind) -> String {
        self.admin
            .create_env(env)
            .await
            .expect("environment created");
        self.key(env, kind).await
    }

    pub async fn key(&self, env: &str, kind: KeyKind) -> String {
        self.admin
            .create_key(env, kind)
            .await
            .expect("key created")
            .secret
    }

    /// Puts a boolean flag that is on and serves `value`; returns the version.
    pub async fn put_bool(&self, env: &str, key: &str, value: bool) -> u64 {
        let flag = Flag::boolean(key, true, value);
        self.put_flag(env, key, flag).await
    }

    /// Puts a flag from its definition (a `Flag` or a JSON document); returns the version.
    pub async fn put_flag(&self, env: &str, key: &str, flag: impl Serialize) -> u64 {
        let written = self.admin.put_flag(env, key, &flag).await;
        written
            .unwrap_or_else(|e| panic!("put flag {key}: {e}"))
            .at
            .version
    }

    /// Puts a segment from its definition; returns the version.
    pub async fn put_segment(&self, env: &str, key: &str, segment: impl Serialize) -> u64 {
        let written = self.admin.put_segment(env, key, &segment).await;
        written
            .unwrap_or_else(|e| panic!("put segment {key}: {e}"))
            .at
            .version
    }

    pub async fn toggle(&self, env: &str, key: &str, on: bool) -> u64 {
        let written = self.admin.toggle(env, key, on).await;
        written
            .unwrap_or_else(|e| panic!("toggle {key}: {e}"))
            .at
            .version
    }

    /// Live sessions on `transport` ("quic" or "tcp"), from the server's /metrics.
    pub async fn sessions(&self, transport: &str) -> u64 {
        self.metric(&format!("vane_sessions{{transport=\"{transport}\"}}"))
            .await
    }

    /// One series of the server's /metrics (`name{labels}`), which must be there.
    pub async fn metric(&self, name: &str) -> u64 {
        let text = self.admin.metrics().await.expect("metrics reachable");
        series(&text, name).unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    /// A client configuration for this server with quick reconnects.
    pub fn client_config(&self, sdk_key: &str, transport: TransportPreference) -> ClientConfig {
        let mut config = ClientConfig::new(self.protocol.to_string(), sdk_key, self.ca.clone());
        config.transport = transport;
        config.sync.backoff_initial = Duration::from_millis(50);
        config.sync.backoff_max = Duration::from_millis(500);
        config
    }

    /// A started client that has received its first snapshot.
    pub async fn client(
        &self,
        sdk_key: &str,
        transport: TransportPreference,
    ) -> (Client, broadcast::Receiver<Update>) {
        start_client(self.client_config(sdk_key, transport)).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts a client and waits for its first update.
pub async fn start_client(config: ClientConfig) -> (Client, broadcast::Receiver<Update>) {
    let (client, updates) = Client::start_with_updates(config).expect("valid client config");
    client
        .wait_for_initialization(PATIENCE)
        .await
        .expect("client initialized");
    (client, updates)
}

/// Waits (within [`PATIENCE`]) until the client's status satisfies `done`; returns that status.
pub async fn status_until(
    status: &mut tokio::sync::watch::Receiver<vane_core::client::Status>,
    done: impl FnMut(&vane_core::client::Status) -> bool,
) -> vane_core::client::Status {
    tokio::time::timeout(PATIENCE, status.wait_for(done))
        .await
        .expect("the client reached the expected status in time")
        .expect("the client is alive")
        .clone()
}

/// The next update, within [`PATIENCE`].
pub async fn next_update(rx: &mut broadcast::Receiver<Update>) -> Update {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("an update in time")
        .expect("update channel open")
}

/// The next update that reaches `version`, skipping up-to-date confirmations.
pub async fn update_at(rx: &mut broadcast::Receiver<Update>, version: u64) -> Update {
    loop {
        let u = next_update(rx).await;
        if u.selector.version >= version {
            return u;
        }
    }
}

/// A TCP proxy on loopback whose live connections can be cut, to break sessions from outside.
/// While cut, it also refuses new connections (accepts and drops them) until restored.
pub struct Proxy {
    pub addr: SocketAddr,
    /// Where new connections go ([`Proxy::retarget`]).
    target: Arc<parking_lot::Mutex<SocketAddr>>,
    pipes: Arc<parking_lot::Mutex<Vec<AbortHandle>>>,
    open: Arc<std::sync::atomic::AtomicBool>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let addr = listener.local_addr().unwrap();
        let pipes: Arc<parking_lot::Mutex<Vec<AbortHandle>>> = Arc::default();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let target = Arc::new(parking_lot::Mutex::new(target));
        let (registry, gate, to) = (pipes.clone(), open.clone(), target.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !gate.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection fail
                }
                let target = *to.lock();
                let pipe = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                registry.lock().push(pipe.abort_handle());
            }
        });
        Proxy {
            addr,
            target,
            pipes,
            open,
            accept,
        }
    }

    /// Sends new connections to `target` from now on (a load balancer moving clients to
    /// another node); live ones stay where they are.
    pub fn retarget(&self, target: SocketAddr) {
        *self.target.lock() = target;
    }

    /// Drops every live connection through the proxy and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for pipe in self.pipes.lock().drain(..) {
            pipe.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// The URL of a database of its own on the test PostgreSQL cluster (`VANE_TEST_POSTGRES`, which
/// scripts/test-all sets): a new name, which the first node to start creates.
pub fn postgres_database() -> String {
    let server = std::env::var("VANE_TEST_POSTGRES").unwrap_or_else(|_| {
        panic!(
            "needs PostgreSQL: VANE_TEST_POSTGRES=postgres://USER@HOST:PORT (scripts/test-all \
             starts a private cluster; or `scripts/postgres start DIR`)"
        )
    });
    format!("{server}/vane_{}", hex::encode(rand::random::<[u8; 8]>()))
}

/// A TLS connection to the protocol port that speaks whatever the test writes.
pub async fn raw_tls(server: &TestServer) -> tokio_rustls::client::TlsStream<TcpStream> {
    raw_tls_offering(server, vec![vane_proto::ALPN.to_vec()])
        .await
        .expect("TLS handshake")
}

/// The same, offering these ALPN protocols (none: offering no ALPN at all).
pub async fn raw_tls_offering(
    server: &TestServer,
    alpn: Vec<Vec<u8>>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut config = (*vane_core::client::tls_config(&server.ca).expect("CA usable")).clone();
    config.alpn_protocols = alpn;
    let tcp = TcpStream::connect(server.protocol).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
}

/// A rules-mode Hello with `sdk_key`, for raw sessions.
pub fn hello(sdk_key: &str) -> vane_proto::v1::Frame {
    vane_proto::v1::Hello {
        protocol_version: vane_proto::PROTOCOL_VERSION,
        sdk_key: sdk_key.into(),
        mode: vane_proto::v1::DeliveryMode::Rules.into(),
        ..Default::default()
    }
    .into()
}

/// Reads frames until the server closes the stream; returns them.
pub async fn read_to_end<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
) -> Vec<vane_proto::v1::Frame> {
    use tokio::io::AsyncReadExt;
    use vane_proto::codec;
    let mut buf = bytes::BytesMut::new();
    let mut frames = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        loop {
            while let Some(f) =
                codec::decode(&mut buf, codec::DEFAULT_MAX_FRAME_LEN).expect("server frames decode")
            {
                frames.push(f);
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server closed the connection");
    frames
}

/// The status, code and message of an admin call the server refused.
pub fn refusal<T: std::fmt::Debug>(r: Result<T, AdminError>) -> (u16, ErrorCode, String) {
    match r {
        Err(AdminError::Refused {
            status,
            code,
            message,
        }) => (status, code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A string flag serving "A" or "B" by a 50/50 rollout on the targeting key.
pub fn fifty_fifty() -> serde_json::Value {
    serde_json::json!({"on": true, "variants": {"a": "A", "b": "B"}, "off_variant": "a",
        "fallthrough": {"rollout": {"variants": [{"variant": "a", "weight": 50000},
                                                  {"variant": "b", "weight": 50000}]}}})
}

/// The value of one series (`name{labels}`) in /metrics text, if it is there.
pub fn series(metrics: &str, name: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|n| n.trim().parse().ok())
}
