//! Network faults between clients and a server: the server runs inside a network namespace this
//! test creates (joined to the host by a veth pair), and nftables rules inside it block UDP or
//! drop packets at random. Clients are the Rust client in the test process, on the host side.
//! Needs root and `nft` (Debian's nftables; `scripts/test-all` installs it). Each test prints
//! what it measured (`--no-capture`) for docs/RELIABILITY.md; it asserts behaviour only.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{PATIENCE, Served, admin, env_with_key, serve_with, vane_via};
use vane_core::client::{Client, ClientConfig, TransportPreference};
use vane_core::model::Flag;
use vane_core::protocol::Transport;
use vane_server::api::client::AdminClient;

/// Runs a command that must succeed.
fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (the network fault tests need iproute2)"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace joined to the host by a veth pair, removed when dropped. Its name and
/// addresses come from the test process's id, so tests in parallel processes do not meet.
struct Netns {
    name: String,
    ns_ip: String,
}

impl Netns {
    fn create() -> Netns {
        let pid = std::process::id();
        let name = format!("vane-test-{pid}");
        let (host_if, ns_if) = (format!("vh{pid}"), format!("vn{pid}"));
        let subnet = format!("10.{}.{}", 100 + (pid >> 8) % 100, pid % 256);
        let (host_ip, ns_ip) = (format!("{subnet}.1"), format!("{subnet}.2"));
        // A namespace left by a killed run of the same pid.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh("ip", &["netns", "add", &name]);
        let ns = Netns { name, ns_ip };
        sh(
            "ip",
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
            ],
        );
        sh("ip", &["link", "set", &ns_if, "netns", &ns.name]);
        sh(
            "ip",
            &["addr", "add", &format!("{host_ip}/24"), "dev", &host_if],
        );
        sh("ip", &["link", "set", &host_if, "up"]);
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", ns.ns_ip),
            "dev",
            &ns_if,
        ]);
        ns.exec(&["ip", "link", "set", &ns_if, "up"]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn exec(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        sh("ip", &all);
    }

    /// Replaces the namespace's nftables rules with `rules` (the body of a table).
    fn rules(&self, rules: &str) {
        let _ = Command::new("ip")
            .args([
                "netns", "exec", &self.name, "nft", "delete", "table", "inet", "fault",
            ])
            .output();
        if rules.is_empty() {
            return;
        }
        let mut nft = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft (Debian's nftables package) is installed");
        use std::io::Write;
        let table = format!("table inet fault {{\n{rules}\n}}\n");
        nft.stdin
            .take()
            .unwrap()
            .write_all(table.as_bytes())
            .unwrap();
        let out = nft.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `vane serve` inside the namespace, with a 2 s heartbeat so that a silent path is noticed
    /// within 2 + 0.4 + 3 s.
    fn serve(&self, data: &Path) -> Served {
        let cmd = vane_via(&["ip", "netns", "exec", &self.name], data);
        let listen = format!("{}:7443", self.ns_ip);
        let http = format!("{}:7480", self.ns_ip);
        serve_with(
            cmd,
            &["--listen", &listen, "--http", &http, "--heartbeat", "2"],
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and with it the host's end.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

const UDP_BLOCKED: &str =
    "chain input { type filter hook input priority 0; meta l4proto udp drop; }
chain output { type filter hook output priority 0; meta l4proto udp drop; }";

/// 5% of packets lost each way, whatever the protocol.
const LOSSY: &str =
    "chain input { type filter hook input priority 0; numgen random mod 100 < 5 drop; }
chain output { type filter hook output priority 0; numgen random mod 100 < 5 drop; }";

struct Setup {
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    ns: Netns,
    served: Served,
    admin: AdminClient,
    key: String,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_owned();
    let ns = Netns::create();
    let served = ns.serve(&data);
    let admin = admin(&data, &served);
    let key = env_with_key(&admin, "prod").await;
    admin
        .put_flag("prod", "a", &Flag::boolean("a", false, true))
        .await
        .unwrap();
    Setup {
        _dir: dir,
        data,
        ns,
        served,
        admin,
        key,
    }
}

impl Setup {
    fn client(&self, transport: TransportPreference) -> Client {
        let ca = std::fs::read(self.data.join("tls/ca.pem")).unwrap();
        let mut config = ClientConfig::new(self.served.protocol.clone(), &self.key, ca);
        config.server_name = Some("localhost".into());
        config.transport = transport;
        config.sync.backoff_initial = Duration::from_millis(50);
        config.sync.backoff_max = Duration::from_millis(500);
        Client::start(config).unwrap()
    }

    /// Toggles `a` and returns the version written.
    async fn toggle(&self, on: bool) -> u64 {
        self.admin.toggle("prod", "a", on).await.unwrap().at.version
    }
}

/// Waits until `client` is at `version` or later; returns how long that took.
async fn reaches(client: &Client, version: u64) -> Duration {
    let start = Instant::now();
    let mut status = client.watch_status();
    tokio::time::timeout(
        PATIENCE,
        status.wait_for(|s| s.selector.is_some_and(|s| s.version >= version)),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "client never reached version {version}: {:?}",
            client.status()
        )
    })
    .unwrap();
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_udp_blocked_clients_connect_over_tcp() {
    let s = setup().await;
    s.ns.rules(UDP_BLOCKED);
    let started = Instant::now();
    let client = s.client(TransportPreference::Auto);
    client.wait_for_initialization(PATIENCE).await.unwrap();
    let connected = started.elapsed();
    assert_eq!(client.status().transport, Some(Transport::Tcp));
    let version = s.toggle(true).await;
    reaches(&client, version).await;
    assert!(client.bool_value("a", false));
    eprintln!("UDP blocked: first connection (over TCP) initialized after {connected:?}");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_session_whose_udp_path_dies_moves_to_tcp_within_the_bound() {
    let s = setup().await;
    let client = s.client(TransportPreference::Auto);
    client.wait_for_initialization(PATIENCE).await.unwrap();
    assert_eq!(client.status().transport, Some(Transport::Quic));
    // Idle for a moment, then UDP silently disappears: nothing tells either side.
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.ns.rules(UDP_BLOCKED);
    let blocked = Instant::now();
    let version = s.toggle(true).await;
    reaches(&client, version).await;
    let took = blocked.elapsed();
    let status = client.status();
    assert_eq!(status.transport, Some(Transport::Tcp));
    let why = status.last_error.unwrap_or_default();
    assert!(
        why.contains("probe"),
        "the dead path was found by the probe: {why}"
    );
    eprintln!(
        "UDP dropped under a live QUIC session (heartbeat 2 s, bound 5.4 s + reconnect): \
         the change made then arrived over TCP after {took:?}"
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_random_loss_both_transports_converge() {
    let s = setup().await;
    let quic = s.client(TransportPreference::Quic);
    let tcp = s.client(TransportPreference::Tcp);
    quic.wait_for_initialization(PATIENCE).await.unwrap();
    tcp.wait_for_initialization(PATIENCE).await.unwrap();
    s.ns.rules(LOSSY);
    let mut last = 0;
    for i in 0..40 {
        last = s.toggle(i % 2 == 0).await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (q, t) = tokio::join!(reaches(&quic, last), reaches(&tcp, last));
    assert!(!quic.bool_value("a", true) && !tcp.bool_value("a", true));
    assert_eq!(quic.status().transport, Some(Transport::Quic));
    eprintln!("5% loss each way, 40 changes: QUIC at the last after {q:?}, TCP after {t:?}");
    quic.close().await;
    tcp.close().await;
}

/// Only HTTP gets through: UDP and the protocol's TCP port are dropped.
const HTTP_ONLY: &str = "chain input { type filter hook input priority 0; meta l4proto udp drop; tcp dport 7443 drop; }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_only_http_gets_through_the_client_polls_and_streams_again_when_it_can() {
    let s = setup().await;
    s.ns.rules(HTTP_ONLY);
    let ca = std::fs::read(s.data.join("tls/ca.pem")).unwrap();
    let mut config = ClientConfig::new(s.served.protocol.clone(), &s.key, ca);
    config.server_name = Some("localhost".into());
    config.http_endpoint = Some(s.served.http.clone());
    config.poll_after_failures = 2;
    config.connect_timeout = Duration::from_secs(1);
    config.sync.backoff_initial = Duration::from_millis(50);
    config.sync.backoff_max = Duration::from_millis(500);
    let started = Instant::now();
    let client = Client::start(config).unwrap();
    client.wait_for_initialization(PATIENCE).await.unwrap();
    let initialized = started.elapsed();
    let status = client.status();
    assert!(status.polling, "{status:?}");
    assert_eq!(status.transport, None);
    assert!(!client.bool_value("a", true));
    // Changes arrive by polling.
    let version = s.toggle(true).await;
    let by_poll = reaches(&client, version).await;
    assert!(client.status().polling);
    assert!(client.bool_value("a", false));
    // The protocol port opens again: the client streams, from where it stands (by delta).
    s.ns.rules("");
    let mut status = client.watch_status();
    let streaming = tokio::time::timeout(
        PATIENCE,
        status.wait_for(|s| s.transport.is_some() && !s.polling),
    )
    .await
    .expect("streaming again")
    .unwrap()
    .clone();
    let back = s.toggle(false).await;
    reaches(&client, back).await;
    assert!(!client.bool_value("a", true));
    eprintln!(
        "HTTP only: initialized by polling after {initialized:?}, a change arrived by polling \
         after {by_poll:?}; streaming again over {:?} once the port opened",
        streaming.transport
    );
    client.close().await;
}
