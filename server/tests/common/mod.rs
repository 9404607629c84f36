//! What the process-level tests share: the `vane` binary as a child process, started and
//! stopped (politely or with SIGKILL) the way people and supervisors do.

#![allow(dead_code)] // each test binary uses its own part of this

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const PATIENCE: Duration = Duration::from_secs(30);

/// `vane --data DATA`, logging warnings only, ignoring any admin token in the environment.
pub fn vane(data: &Path) -> Command {
    vane_via(&[], data)
}

/// The same, run by `wrapper` (`ip netns exec NS`, which then execs `vane`).
pub fn vane_via(wrapper: &[&str], data: &Path) -> Command {
    let bin = env!("CARGO_BIN_EXE_vane");
    let mut cmd = match wrapper.split_first() {
        None => Command::new(bin),
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(bin);
            cmd
        }
    };
    cmd.arg("--data")
        .arg(data)
        .env_remove("VANE_ADMIN_TOKEN")
        .env("VANE_LOG", "warn");
    cmd
}

/// A child process whose stdout lines arrive on a channel.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    pub fn spawn(mut cmd: Command) -> Running {
        // The server's log, when a test is being looked into: VANE_TEST_SERVER_LOG=1.
        let log = match std::env::var_os("VANE_TEST_SERVER_LOG") {
            Some(_) => Stdio::inherit(),
            None => Stdio::null(),
        };
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines }
    }

    pub fn line(&self) -> String {
        self.lines
            .recv_timeout(PATIENCE)
            .expect("a line of output in time")
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    fn wait_exit(&mut self, what: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit after {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and the exit status once it has exited.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("-TERM");
        self.wait_exit("SIGTERM")
    }

    /// SIGKILL: no shutdown, no GoAway, nothing flushed that was not already.
    pub fn kill9(&mut self) {
        self.signal("-KILL");
        self.wait_exit("SIGKILL");
    }

    /// The process's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the process is alive");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A started server and where it listens.
pub struct Served {
    pub process: Running,
    /// `HOST:PORT` of the protocol listener.
    pub protocol: String,
    /// `http://HOST:PORT`.
    pub http: String,
}

/// `vane serve` on ephemeral loopback ports.
pub fn serve(data: &Path) -> Served {
    serve_loopback(data, &[])
}

/// The same, with more arguments.
pub fn serve_loopback(data: &Path, extra: &[&str]) -> Served {
    let mut args = vec!["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    serve_with(vane(data), &args)
}

/// The admin API of the server on `data`, with the token it made.
pub fn admin(data: &Path, served: &Served) -> vane_server::api::client::AdminClient {
    let token = std::fs::read_to_string(data.join("admin-token")).expect("admin token");
    vane_server::api::client::AdminClient::new(served.http.clone(), token.trim())
}

/// Creates `env` with a server key; returns the key's secret.
pub async fn env_with_key(admin: &vane_server::api::client::AdminClient, env: &str) -> String {
    admin.create_env(env).await.expect("environment created");
    admin
        .create_key(env, vane_server::keys::KeyKind::Server)
        .await
        .expect("key created")
        .secret
}

/// Runs `cmd` (a `vane --data …` command, or one that execs it) with `serve` and `args`, and
/// waits until it is ready.
pub fn serve_with(mut cmd: Command, args: &[&str]) -> Served {
    cmd.arg("serve").args(args);
    let process = Running::spawn(cmd);
    let banner = process.line();
    // "vane X serving: protocol 127.0.0.1:P (QUIC and TCP+TLS), HTTP http://127.0.0.1:Q"
    let protocol = banner
        .split("protocol ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .expect("protocol address in banner")
        .to_owned();
    let http = banner
        .split("HTTP ")
        .nth(1)
        .expect("HTTP URL in banner")
        .to_owned();
    wait_ready(&http);
    Served {
        process,
        protocol,
        http,
    }
}

pub fn wait_ready(http: &str) {
    let deadline = Instant::now() + PATIENCE;
    let addr = http.trim_start_matches("http://");
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            use std::io::{Read, Write};
            let _ = s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("server at {http} never became ready");
}

/// A client of the server whose data directory is `data`, through `endpoint`, retrying fast.
pub fn client_config(
    data: &Path,
    endpoint: &str,
    key: &str,
    transport: vane_core::client::TransportPreference,
) -> vane_core::client::ClientConfig {
    let ca = std::fs::read(data.join("tls/ca.pem")).expect("the CA");
    let mut config = vane_core::client::ClientConfig::new(endpoint.to_owned(), key, ca);
    config.server_name = Some("localhost".into());
    config.transport = transport;
    config.sync.backoff_initial = Duration::from_millis(50);
    config.sync.backoff_max = Duration::from_millis(500);
    config
}

/// A started client and every update it published, collected as they come (so none is lost
/// to a lagging receiver), with when.
pub struct Watched {
    pub client: vane_core::client::Client,
    updates: std::sync::Arc<std::sync::Mutex<Vec<(Instant, vane_core::sync::Update)>>>,
}

/// Starts a client and waits until it has flags. (A key made through another node of a cluster
/// that this one has not heard of yet is answered INITIALIZING, and the client retries.)
pub async fn watch(config: vane_core::client::ClientConfig) -> Watched {
    let watched = start_watching(config);
    watched
        .client
        .wait_for_initialization(PATIENCE)
        .await
        .expect("the client initialized");
    watched
}

fn start_watching(config: vane_core::client::ClientConfig) -> Watched {
    use tokio::sync::broadcast::error::RecvError;
    let (client, mut rx) = vane_core::client::Client::start_with_updates(config).unwrap();
    let updates = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let into = updates.clone();
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(u) => into.lock().unwrap().push((Instant::now(), u)),
                Err(RecvError::Lagged(n)) => panic!("lost {n} updates"),
                Err(RecvError::Closed) => return,
            }
        }
    });
    Watched { client, updates }
}

impl Watched {
    /// Waits until the client stands at `at` or later (a write whose answer was lost may have
    /// committed after it); returns when it got there.
    pub async fn reach(&self, at: vane_core::protocol::Selector) -> Instant {
        let reached =
            |s: &vane_core::protocol::Selector| s.epoch == at.epoch && s.version >= at.version;
        let mut status = self.client.watch_status();
        tokio::time::timeout(
            PATIENCE,
            status.wait_for(|s| s.selector.as_ref().is_some_and(reached)),
        )
        .await
        .unwrap_or_else(|_| panic!("client never reached {at:?}: {:?}", self.client.status()))
        .unwrap();
        let updates = self.updates.lock().unwrap();
        updates
            .iter()
            .find(|(_, u)| reached(&u.selector))
            .map_or_else(Instant::now, |(t, _)| *t)
    }

    /// The kinds of the updates after `t`.
    pub fn kinds_after(&self, t: Instant) -> Vec<vane_core::sync::UpdateKind> {
        let updates = self.updates.lock().unwrap();
        updates
            .iter()
            .filter(|(at, _)| *at > t)
            .map(|(_, u)| u.kind)
            .collect()
    }
}

type Acked = std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>;
type InDoubt = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Four writers putting new flags (`w{w}-{n}`) into `prod` through `admin`, each until the server
/// stops answering: what a `kill -9` in the middle of writes is tested with.
pub struct Writers {
    acked: Acked,
    in_doubt: InDoubt,
    /// How many writes are acknowledged so far.
    pub progress: tokio::sync::watch::Receiver<usize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    pub fn start(admin: &vane_server::api::client::AdminClient) -> Writers {
        let acked: Acked = std::sync::Arc::default();
        let in_doubt: InDoubt = std::sync::Arc::default();
        let (progress, acks) = tokio::sync::watch::channel(0usize);
        let progress = std::sync::Arc::new(progress);
        let tasks = (0..4)
            .map(|w| {
                let (admin, progress) = (admin.clone(), progress.clone());
                let (acked, in_doubt) = (
                    std::sync::Arc::clone(&acked),
                    std::sync::Arc::clone(&in_doubt),
                );
                tokio::spawn(async move {
                    for n in 0..100_000 {
                        let key = format!("w{w}-{n}");
                        let flag = vane_core::model::Flag::boolean(&key, n % 2 == 0, true);
                        match admin.put_flag("prod", &key, &flag).await {
                            Ok(written) => {
                                let mut acked: std::sync::MutexGuard<
                                    '_,
                                    std::collections::BTreeMap<String, u64>,
                                > = acked.lock().unwrap();
                                acked.insert(key, written.at.version);
                                progress.send_modify(|n| *n += 1);
                            }
                            Err(_) => {
                                // Sent, but no answer: committed or not, either is correct.
                                in_doubt.lock().unwrap().push(key);
                                return;
                            }
                        }
                    }
                })
            })
            .collect();
        Writers {
            acked,
            in_doubt,
            progress: acks,
            tasks,
        }
    }

    /// Waits until `n` writes are acknowledged.
    pub async fn wait_for(&mut self, n: usize) {
        tokio::time::timeout(PATIENCE, self.progress.wait_for(|acked| *acked >= n))
            .await
            .expect("the writers got going")
            .unwrap();
    }

    /// Waits for every writer to stop (the server is gone); the acknowledged writes (key →
    /// version) and the ones sent without an answer.
    pub async fn finish(self) -> (std::collections::BTreeMap<String, u64>, Vec<String>) {
        for task in self.tasks {
            task.await.unwrap();
        }
        let acked = self.acked.lock().unwrap().clone();
        let in_doubt = self.in_doubt.lock().unwrap().clone();
        (acked, in_doubt)
    }
}
