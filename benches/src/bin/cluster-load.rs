//! Several nodes on one PostgreSQL database, under load: `--nodes` `vane serve --store URL`
//! processes this tool starts (loopback only, the same certificates), `--clients` sessions, and
//! the admin writes through the first node. Three phases, one run:
//!
//! 1. **one node**: every session on node 0; propagation from commit to each session;
//! 2. **across nodes**: the same number of sessions spread evenly over every node, writes still
//!    through node 0: cross-node propagation beside phase 1;
//! 3. **failover**: node 1 is killed (SIGKILL); its sessions move to the other nodes (each
//!    session tries the others in turn, as behind a load balancer) and resume: how long until
//!    every one of them is back, and how many by delta rather than by snapshot.
//!
//! ```sh
//! cargo build --release -p vane-server -p vane-benches --bins
//! target/release/cluster-load --vane target/release/vane --store postgres://postgres@127.0.0.1:5432/load \
//!   --clients 3000 --changes 20
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use vane_benches::load::fleet::{CatchUp, Fleet, FleetSpec};
use vane_benches::load::{LoadTransport, now_ns};
use vane_benches::load::{delivery_latencies as latencies, latency_summary as summary, percentile};
use vane_benches::spawned::SpawnedVane;

#[derive(Debug, Parser)]
struct Args {
    /// The `vane` binary to start.
    #[arg(long)]
    vane: PathBuf,
    /// The PostgreSQL database every node uses (created if it does not exist; give a new name
    /// for each run).
    #[arg(long)]
    store: String,
    /// Nodes to start (at least 2).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Sessions in each phase.
    #[arg(long, default_value_t = 1_000)]
    clients: usize,
    /// Changes per propagation phase.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Milliseconds between changes.
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
    /// HTTP port of node 0 (loopback); node i uses this + 10 i, its protocol port the next one.
    #[arg(long, default_value_t = 31480)]
    port: u16,
    /// Bound on each wait, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
}

struct Run {
    args: Args,
    key: String,
    ca: String,
    transport: LoadTransport,
    deadline: Duration,
}

impl Run {
    fn fleet(&self, endpoint: SocketAddr, fallbacks: Vec<SocketAddr>, clients: usize) -> Fleet {
        Fleet::start(FleetSpec {
            endpoint,
            fallbacks,
            transport: self.transport,
            ca_pem: self.ca.clone(),
            sdk_key: self.key.clone(),
            clients,
        })
        .expect("fleet")
    }

    /// Waits until every session of `fleets` holds `version` (or, with `since_ns`, resumed
    /// after it).
    async fn wait(&self, fleets: &[&Fleet], what: &str, done: impl Fn(&[&Fleet]) -> bool) {
        let until = Instant::now() + self.deadline;
        while !done(fleets) {
            let failed: usize = fleets.iter().map(|f| f.status(0, 0).failed).sum();
            assert!(failed == 0, "{what}: {failed} sessions gave up");
            assert!(
                Instant::now() < until,
                "{what}: not within {:?}",
                self.deadline
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn ready(&self, fleets: &[&Fleet]) {
        self.wait(fleets, "every session connected", |fs| {
            fs.iter().all(|f| f.status(0, 0).ready >= f.len())
        })
        .await;
    }

    /// Toggles the load flag through `node` `changes` times; (version, committed_at_ns) each.
    async fn changes(&self, node: &SpawnedVane, from: usize) -> Vec<(u64, u128)> {
        let mut committed = Vec::new();
        for n in 0..self.args.changes {
            let w = node
                .admin
                .toggle("load", "load", (from + n) % 2 == 1)
                .await
                .expect("toggle");
            committed.push((w.at.version, w.committed_at_ns));
            tokio::time::sleep(Duration::from_millis(self.args.interval_ms)).await;
        }
        committed
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    assert!(args.nodes >= 2, "--nodes: at least 2");
    // TCP+TLS sessions (the nodes are started without QUIC), all from one loopback address: no
    // per-source connection limit.
    let transport = LoadTransport::Tcp;
    let extra: Vec<String> = ["--store", &args.store, "--connect-rate", "0"]
        .map(str::to_owned)
        .to_vec();
    let first = SpawnedVane::start(&args.vane, args.port, &extra).await;
    let mut nodes = vec![first];
    for i in 1..args.nodes {
        let port = args.port + 10 * i as u16;
        let node = SpawnedVane::start_like(&nodes[0], &args.vane, port, &extra).await;
        nodes.push(node);
    }
    let key = nodes[0].load_env().await;
    let ca = nodes[0].ca();
    let addrs: Vec<SocketAddr> = nodes
        .iter()
        .map(|n| n.listen.parse().expect("address"))
        .collect();
    // Every node holds the environment before sessions arrive. A session shown to a node that
    // has not heard of the key yet is told to retry shortly (INITIALIZING), so nothing waits
    // for that.
    let until = Instant::now() + Duration::from_secs(args.timeout_s);
    for node in &nodes {
        while node
            .admin
            .env("load")
            .await
            .map(|e| e.at.version)
            .unwrap_or(0)
            < 1
        {
            assert!(Instant::now() < until, "the nodes follow node 0");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let run = Run {
        deadline: Duration::from_secs(args.timeout_s),
        args,
        key,
        ca,
        transport,
    };
    let clients = run.args.clients;

    // 1. One node.
    let fleet = run.fleet(addrs[0], Vec::new(), clients);
    run.ready(&[&fleet]).await;
    let committed = run.changes(&nodes[0], 0).await;
    let last = committed.last().map_or(0, |c| c.0);
    run.wait(&[&fleet], "one node: every change delivered", |fs| {
        fs[0].status(last, 0).reached >= clients
    })
    .await;
    let one = fleet.finish().await;
    let (one_node, missing_one) = latencies(std::slice::from_ref(&one), &committed);

    // 2. Across nodes: the same clients spread evenly, writes through node 0.
    let per = clients / nodes.len();
    let fleets: Vec<Fleet> = (0..nodes.len())
        .map(|i| {
            let others = addrs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, a)| *a)
                .collect();
            let n = if i == 0 {
                clients - per * (nodes.len() - 1)
            } else {
                per
            };
            run.fleet(addrs[i], others, n)
        })
        .collect();
    let refs: Vec<&Fleet> = fleets.iter().collect();
    run.ready(&refs).await;
    let committed = run.changes(&nodes[0], run.args.changes).await;
    let last = committed.last().map_or(0, |c| c.0);
    run.wait(&refs, "across nodes: every change delivered", |fs| {
        fs.iter().all(|f| f.status(last, 0).reached >= f.len())
    })
    .await;

    // 3. Failover: node 1 dies; its sessions go to the others and resume.
    let killed_ns = now_ns();
    let killed = Instant::now();
    nodes[1].kill();
    let moved = &fleets[1];
    run.wait(
        &[moved],
        "failover: every session of node 1 resumed",
        |fs| fs[0].status(0, killed_ns).resumed >= fs[0].len(),
    )
    .await;
    let all_back = killed.elapsed();
    // One more change reaches everyone still running, the moved sessions included.
    let after = nodes[0]
        .admin
        .toggle("load", "load", true)
        .await
        .expect("toggle");
    let version = after.at.version;
    run.wait(&refs, "after failover: the next change delivered", |fs| {
        fs.iter().all(|f| f.status(version, 0).reached >= f.len())
    })
    .await;

    let mut observations = Vec::new();
    for f in fleets {
        observations.push(f.finish().await);
    }
    let (across, missing_across) = latencies(&observations[..], &committed);
    for (i, o) in observations.iter().enumerate() {
        let (lat, missing) = latencies(std::slice::from_ref(o), &committed);
        println!(
            "{}",
            summary(&format!("  node {i}'s sessions"), &lat, missing)
        );
    }
    let moved = &observations[1];
    let (mut by_delta, mut by_snapshot, mut resumed_ms) = (0, 0, Vec::new());
    for s in &moved.sessions {
        if let Some((at, how)) = s.catch_ups.iter().find(|(at, _)| *at > killed_ns) {
            match how {
                CatchUp::Snapshot => by_snapshot += 1,
                CatchUp::Delta | CatchUp::UpToDate => by_delta += 1,
            }
            resumed_ms.push((*at as f64 - killed_ns as f64) / 1e6);
        }
    }
    resumed_ms.sort_by(f64::total_cmp);
    println!(
        "{} nodes on PostgreSQL, {clients} TCP+TLS sessions, {} changes through node 0 per phase",
        nodes.len(),
        run.args.changes
    );
    println!("{}", summary("one node", &one_node, missing_one));
    println!("{}", summary("across nodes", &across, missing_across));
    println!(
        "cross-node p99 / one-node p99 = {:.2}",
        percentile(&across, 0.99) / percentile(&one_node, 0.99)
    );
    println!(
        "failover: node 1 killed with {} sessions; all resumed on the others after {:.2} s \
         (p50 {:.0} ms, p99 {:.0} ms); {by_delta} by delta or up to date, {by_snapshot} by snapshot \
         ({:.1}% by delta)",
        moved.sessions.len(),
        all_back.as_secs_f64(),
        percentile(&resumed_ms, 0.5),
        percentile(&resumed_ms, 0.99),
        100.0 * by_delta as f64 / moved.sessions.len().max(1) as f64
    );
}
