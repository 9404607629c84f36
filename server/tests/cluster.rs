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

use common::{
    PATIENCE, Served, Writers, admin, client_config, env_with_key, serve_loopback, watch,
};
use tokio::net::{TcpListener, TcpStream};
use vane_core::client::TransportPreference;
use vane_core::model::Flag;
use vane_core::protocol::Selector;
use vane_core::sync::UpdateKind;
use vane_server::api::client::AdminClient;

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

/// A database of its own on the test cluster: a new name, which the first node creates.
fn postgres_database() -> String {
    database_on(&test_cluster())
}

/// The URL of a new database name on the cluster at `server`.
fn database_on(server: &str) -> String {
    format!("{server}/vane_{}", hex::encode(rand::random::<[u8; 8]>()))
}

/// Waits until `admin`'s node holds every acknowledged write of `prod` at the version it was
/// acknowledged with; returns the environment's selector then, and every flag's version.
async fn holding(
    admin: &AdminClient,
    acked: &BTreeMap<String, u64>,
) -> (Selector, BTreeMap<String, u64>) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let info = admin.env("prod").await.unwrap();
        let flags = admin.flags("prod").await.unwrap();
        let present: BTreeMap<String, u64> = flags
            .flags
            .iter()
            .map(|f| (f.key.clone(), f.version))
            .collect();
        if acked.iter().all(|(k, v)| present.get(k) == Some(v)) {
            let at = Selector {
                epoch: info.at.epoch,
                version: info.at.version,
            };
            return (at, present);
        }
        assert!(
            Instant::now() < deadline,
            "the node lacks acknowledged writes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_node_during_writes_loses_nothing_and_its_clients_resume_on_the_other() {
    let store = postgres_database();
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
        clients.push(
            watch(client_config(
                dir_a.path(),
                &front,
                &key,
                TransportPreference::Tcp,
            ))
            .await,
        );
    }
    // Node b knows the key before a dies (it follows a within the interval).
    let probe = watch(client_config(
        dir_a.path(),
        &b.protocol,
        &key,
        TransportPreference::Tcp,
    ))
    .await;
    probe.client.close().await;

    // Four writers through node a, each putting new flags until a is gone.
    let mut writers = Writers::start(&admin_a);
    writers.wait_for(200).await;
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
    let (acked, in_doubt) = writers.finish().await;

    // Node b has every acknowledged write, at the version it was acknowledged with.
    let (last, present) = holding(&admin_b, &acked).await;
    let committed_in_doubt = in_doubt.iter().filter(|k| present.contains_key(*k)).count();
    assert_eq!(
        present.len(),
        acked.len() + committed_in_doubt,
        "nothing else"
    );

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
    let store = database_on(&pg.url);
    let dir_a = tempfile::tempdir().unwrap();
    let args = ["--store", store.as_str(), "--follow-interval-ms", "500"];
    let a = serve_loopback(dir_a.path(), &args);
    let dir_b = data_dir_like(dir_a.path());
    let b = serve_loopback(dir_b.path(), &args);
    let (admin_a, admin_b) = (admin(dir_a.path(), &a), admin(dir_b.path(), &b));
    let key = env_with_key(&admin_a, "prod").await;
    let mut clients = Vec::new();
    for _ in 0..2 {
        clients.push(
            watch(client_config(
                dir_a.path(),
                &b.protocol,
                &key,
                TransportPreference::Tcp,
            ))
            .await,
        );
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
    // Whether a client of b lost its connection while the database was away (it should not:
    // sessions need only the node).
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for c in &clients {
        let (mut status, dropped) = (c.client.watch_status(), dropped.clone());
        tokio::spawn(async move {
            let connected = vane_core::client::ConnectionState::Connected;
            if status.wait_for(|s| s.state != connected).await.is_ok() {
                dropped.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        });
    }
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
    let (at, _) = holding(&admin_b, &acked).await;
    for c in &clients {
        c.reach(at).await;
        for k in acked.keys() {
            assert!(c.client.bool_value(k, false), "{k}");
        }
    }
    assert!(
        !dropped.load(std::sync::atomic::Ordering::SeqCst),
        "b's clients stayed connected while the database restarted"
    );
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
