//! Several `vane serve --store postgres://…` processes on one database, behind a load balancer,
//! and the faults operators meet there: `kill -9` of a node in the middle of writes. The
//! database is the test cluster scripts/test-all starts (`VANE_TEST_POSTGRES`). Prints what it
//! measured (`--no-capture`); the assertions are about behaviour only.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{PATIENCE, Served, admin, env_with_key, serve_loopback};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use vane_core::client::{Client, ClientConfig, TransportPreference};
use vane_core::model::Flag;
use vane_core::protocol::Selector;
use vane_core::sync::{Update, UpdateKind};

/// The test cluster's URL, without a database.
fn test_cluster() -> String {
    std::env::var("VANE_TEST_POSTGRES").unwrap_or_else(|_| {
        panic!(
            "needs PostgreSQL: VANE_TEST_POSTGRES=postgres://USER@HOST:PORT (scripts/test-all \
             starts a private cluster; or `scripts/postgres start DIR`)"
        )
    })
}

/// A PostgreSQL cluster of one test's own, for a test that restarts it (scripts/postgres);
/// stopped when dropped.
struct OwnCluster {
    dir: tempfile::TempDir,
    url: String,
}

fn scripts_postgres(command: &str, dir: &Path) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/postgres");
    let out = std::process::Command::new(script)
        .arg(command)
        .arg(dir)
        .output()
        .expect("scripts/postgres runs");
    assert!(
        out.status.success(),
        "scripts/postgres {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

impl OwnCluster {
    fn start() -> OwnCluster {
        let dir = tempfile::tempdir().unwrap();
        let url = scripts_postgres("start", dir.path());
        OwnCluster { dir, url }
    }

    fn restart(&self) {
        scripts_postgres("restart", self.dir.path());
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        scripts_postgres("stop", self.dir.path());
    }
}

/// A new, empty database on the test cluster; its URL.
async fn postgres_database() -> String {
    database_on(&test_cluster()).await
}

/// A new, empty database on the cluster at `server`; its URL.
async fn database_on(server: &str) -> String {
    let name = format!("vane_{}", hex::encode(rand::random::<[u8; 8]>()));
    let (client, connection) =
        tokio_postgres::connect(&format!("{server}/postgres"), tokio_postgres::NoTls)
            .await
            .expect("the test cluster answers");
    let connection = tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    drop(client);
    let _ = connection.await;
    format!("{server}/{name}")
}

/// A TCP load balancer on loopback: each new connection goes to the first node that accepts
/// it, so clients stay on the first node while it lives and move when it dies.
async fn balancer(nodes: Vec<String>) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let nodes = nodes.clone();
            tokio::spawn(async move {
                for node in &nodes {
                    if let Ok(mut outbound) = TcpStream::connect(node).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

/// A node's data directory with `peer`'s certificates: the nodes serve one name.
fn data_dir_like(peer: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tls")).unwrap();
    for file in std::fs::read_dir(peer.join("tls")).unwrap() {
        let file = file.unwrap();
        std::fs::copy(file.path(), dir.path().join("tls").join(file.file_name())).unwrap();
    }
    dir
}

fn client_config(data: &Path, endpoint: &str, key: &str) -> ClientConfig {
    let ca = std::fs::read(data.join("tls/ca.pem")).unwrap();
    let mut config = ClientConfig::new(endpoint.to_owned(), key, ca);
    config.server_name = Some("localhost".into());
    config.transport = TransportPreference::Tcp;
    config.sync.backoff_initial = Duration::from_millis(50);
    config.sync.backoff_max = Duration::from_millis(500);
    config
}

/// A client and every update it published, with when.
struct Watched {
    client: Client,
    updates: Arc<Mutex<Vec<(Instant, Update)>>>,
}

/// Starts a client and waits until it has flags. A key made through another node is unknown
/// to this one until it has heard of it (milliseconds, at most the follow interval): the
/// client is started again until then.
async fn watch(config: ClientConfig) -> Watched {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let watched = start_watching(config.clone());
        match watched.client.wait_for_initialization(PATIENCE).await {
            Ok(()) => return watched,
            Err(vane_core::client::ClientError::Rejected(_)) if Instant::now() < deadline => {
                watched.client.close().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no client: {e}"),
        }
    }
}

fn start_watching(config: ClientConfig) -> Watched {
    let (client, mut rx) = Client::start_with_updates(config).unwrap();
    let updates = Arc::new(Mutex::new(Vec::new()));
    let into = updates.clone();
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(u) => into.lock().unwrap().push((Instant::now(), u)),
                Err(broadcast::error::RecvError::Lagged(n)) => panic!("lost {n} updates"),
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    Watched { client, updates }
}

impl Watched {
    /// Waits until the client stands at `at` or later (a write whose answer was lost may have
    /// committed after it).
    async fn reach(&self, at: Selector) {
        let reached = |s: &Selector| s.epoch == at.epoch && s.version >= at.version;
        let mut status = self.client.watch_status();
        tokio::time::timeout(
            PATIENCE,
            status.wait_for(|s| s.selector.as_ref().is_some_and(reached)),
        )
        .await
        .unwrap_or_else(|_| panic!("client never reached {at:?}: {:?}", self.client.status()))
        .unwrap();
    }

    fn kinds_after(&self, t: Instant) -> Vec<UpdateKind> {
        let updates = self.updates.lock().unwrap();
        updates
            .iter()
            .filter(|(at, _)| *at > t)
            .map(|(_, u)| u.kind)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_node_during_writes_loses_nothing_and_its_clients_resume_on_the_other() {
    let store = postgres_database().await;
    let dir_a = tempfile::tempdir().unwrap();
    let args = ["--store", store.as_str(), "--follow-interval-ms", "500"];
    let mut a: Served = serve_loopback(dir_a.path(), &args);
    let dir_b = data_dir_like(dir_a.path());
    let b = serve_loopback(dir_b.path(), &args);
    let (admin_a, admin_b) = (admin(dir_a.path(), &a), admin(dir_b.path(), &b));
    let key = env_with_key(&admin_a, "prod").await;

    // Clients reach the nodes through the balancer: all on a while it lives.
    let (front, _balancer) = balancer(vec![a.protocol.clone(), b.protocol.clone()]).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(watch(client_config(dir_a.path(), &front, &key)).await);
    }
    // Node b knows the key before a dies (it follows a within the interval).
    let probe = watch(client_config(dir_a.path(), &b.protocol, &key)).await;
    probe.client.close().await;

    // Four writers through node a, each putting new flags until a is gone.
    let acked = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let in_doubt = Arc::new(Mutex::new(Vec::<String>::new()));
    let (progress, mut acks) = tokio::sync::watch::channel(0usize);
    let progress = Arc::new(progress);
    let mut writers = Vec::new();
    for w in 0..4 {
        let (admin, acked, in_doubt) = (admin_a.clone(), acked.clone(), in_doubt.clone());
        let progress = progress.clone();
        writers.push(tokio::spawn(async move {
            for n in 0..100_000 {
                let key = format!("w{w}-{n}");
                match admin
                    .put_flag("prod", &key, &Flag::boolean(&key, n % 2 == 0, true))
                    .await
                {
                    Ok(written) => {
                        acked.lock().unwrap().insert(key, written.at.version);
                        progress.send_modify(|n| *n += 1);
                    }
                    Err(_) => {
                        // Sent, but no answer: committed or not, either is correct.
                        in_doubt.lock().unwrap().push(key);
                        return;
                    }
                }
            }
        }));
    }
    tokio::time::timeout(PATIENCE, acks.wait_for(|n| *n >= 200))
        .await
        .expect("the writers got going")
        .unwrap();
    // When each client is connected again after losing its node.
    let reconnected: Vec<_> = clients
        .iter()
        .map(|c| {
            let mut status = c.client.watch_status();
            tokio::spawn(async move {
                let connected = vane_core::client::ConnectionState::Connected;
                status.wait_for(|s| s.state != connected).await.unwrap();
                status.wait_for(|s| s.state == connected).await.unwrap();
                Instant::now()
            })
        })
        .collect();
    let killed_at = Instant::now();
    a.process.kill9();
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let in_doubt = in_doubt.lock().unwrap().clone();

    // Node b has every acknowledged write, at the version it was acknowledged with.
    let last = {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let info = admin_b.env("prod").await.unwrap();
            let flags = admin_b.flags("prod").await.unwrap();
            let present: BTreeMap<String, u64> = flags
                .flags
                .iter()
                .map(|f| (f.key.clone(), f.version))
                .collect();
            let all = acked.iter().all(|(k, v)| present.get(k) == Some(v));
            if all {
                let committed_in_doubt =
                    in_doubt.iter().filter(|k| present.contains_key(*k)).count();
                assert_eq!(
                    present.len(),
                    acked.len() + committed_in_doubt,
                    "nothing else"
                );
                break Selector {
                    epoch: info.at.epoch,
                    version: info.at.version,
                };
            }
            assert!(
                Instant::now() < deadline,
                "node b lacks acknowledged writes"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    // a's clients come back through the balancer, on b, by delta.
    let mut resumed = Vec::new();
    for (c, back) in clients.iter().zip(reconnected) {
        c.reach(last).await;
        let back = tokio::time::timeout(PATIENCE, back).await.unwrap().unwrap();
        resumed.push(back.saturating_duration_since(killed_at));
        let kinds = c.kinds_after(killed_at);
        assert!(
            !kinds.contains(&UpdateKind::Snapshot),
            "resumed by delta, not a snapshot: {kinds:?}"
        );
    }
    let after = admin_b
        .put_flag("prod", "after", &Flag::boolean("after", true, true))
        .await
        .unwrap();
    for c in &clients {
        c.reach(Selector {
            epoch: last.epoch,
            version: after.at.version,
        })
        .await;
        assert!(c.client.bool_value("after", false));
    }
    eprintln!(
        "kill -9 of node a during writes through it: {} acknowledged, 0 lost, {} in doubt; \
         its {} clients were connected to b again (and resumed by delta) after {resumed:?}",
        acked.len(),
        in_doubt.len(),
        clients.len()
    );
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_restarted_under_load_nodes_reconnect_and_miss_nothing() {
    let pg = OwnCluster::start();
    let store = database_on(&pg.url).await;
    let dir_a = tempfile::tempdir().unwrap();
    let args = ["--store", store.as_str(), "--follow-interval-ms", "500"];
    let a = serve_loopback(dir_a.path(), &args);
    let dir_b = data_dir_like(dir_a.path());
    let b = serve_loopback(dir_b.path(), &args);
    let (admin_a, admin_b) = (admin(dir_a.path(), &a), admin(dir_b.path(), &b));
    let key = env_with_key(&admin_a, "prod").await;
    let mut clients = Vec::new();
    for _ in 0..2 {
        clients.push(watch(client_config(dir_a.path(), &b.protocol, &key)).await);
    }

    // One writer through a, retrying what fails, until told to stop.
    let acked = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let refused = Arc::new(Mutex::new(Vec::<u16>::new()));
    let (progress, mut acks) = tokio::sync::watch::channel(0usize);
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (admin, acked, refused, stop) = (
            admin_a.clone(),
            acked.clone(),
            refused.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                let key = format!("f{n}");
                match admin
                    .put_flag("prod", &key, &Flag::boolean(&key, true, true))
                    .await
                {
                    Ok(written) => {
                        acked.lock().unwrap().insert(key, written.at.version);
                        progress.send_modify(|n| *n += 1);
                        n += 1;
                    }
                    Err(e) => {
                        let status = match e {
                            vane_server::api::client::AdminError::Refused { status, .. } => status,
                            _ => 0,
                        };
                        refused.lock().unwrap().push(status);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        })
    };
    tokio::time::timeout(PATIENCE, acks.wait_for(|n| *n >= 50))
        .await
        .unwrap()
        .unwrap();
    let restarting = Instant::now();
    let pg = tokio::task::spawn_blocking(move || {
        pg.restart();
        pg
    })
    .await
    .unwrap();
    let restarted = restarting.elapsed();
    // Writes go through again once it is back: fifty more.
    let before = *acks.borrow();
    tokio::time::timeout(PATIENCE, acks.wait_for(|n| *n >= before + 50))
        .await
        .expect("writes succeed again after the restart")
        .unwrap();
    stop.cancel();
    writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    let refused = refused.lock().unwrap().clone();
    assert!(
        refused.iter().all(|s| *s == 503),
        "a write while the database is away is refused as unavailable: {refused:?}"
    );

    // Node b, which followed throughout, has every acknowledged write, and so do its clients.
    let at = {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let info = admin_b.env("prod").await.unwrap();
            let flags = admin_b.flags("prod").await.unwrap();
            let present: BTreeMap<String, u64> = flags
                .flags
                .iter()
                .map(|f| (f.key.clone(), f.version))
                .collect();
            if acked.iter().all(|(k, v)| present.get(k) == Some(v)) {
                break Selector {
                    epoch: info.at.epoch,
                    version: info.at.version,
                };
            }
            assert!(
                Instant::now() < deadline,
                "node b lacks acknowledged writes after the restart"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    for c in &clients {
        c.reach(at).await;
        for k in acked.keys() {
            assert!(c.client.bool_value(k, false), "{k}");
        }
    }
    // And b takes writes again too.
    admin_b
        .put_flag("prod", "after", &Flag::boolean("after", true, true))
        .await
        .unwrap();
    eprintln!(
        "PostgreSQL restarted under writes (restart took {restarted:?}): {} writes \
         acknowledged, {} refused with 503 while it was away, 0 lost; both nodes caught up",
        acked.len(),
        refused.len()
    );
    drop((a, b, pg));
}
