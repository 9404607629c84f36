//! Relays under load: an origin (`vane serve`), a relay of it, and a relay of that relay, all
//! processes this tool starts on loopback (TCP+TLS), and the admin writes through the origin.
//! Three phases, one run, the same number of sessions in each:
//!
//! 1. **origin**: every session on the origin; propagation from commit to each session;
//! 2. **one relay**: every session on the first relay (origin → relay → session);
//! 3. **two relays**: every session on the second relay (origin → relay → relay → session).
//!
//! ```sh
//! cargo build --release -p vane-server -p vane-benches --bins
//! target/release/relay-load --vane target/release/vane --clients 3000 --changes 20
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use vane_benches::load::fleet::{Fleet, FleetSpec};
use vane_benches::load::{LoadTransport, delivery_latencies, latency_summary, percentile};
use vane_benches::spawned::SpawnedVane;

#[derive(Debug, Parser)]
struct Args {
    /// The `vane` binary to start.
    #[arg(long)]
    vane: PathBuf,
    /// Sessions in each phase.
    #[arg(long, default_value_t = 1_000)]
    clients: usize,
    /// Changes per phase.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Milliseconds between changes.
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
    /// HTTP port of the origin (loopback); the relays use this + 10 and + 20, each protocol
    /// port the next one.
    #[arg(long, default_value_t = 30480)]
    port: u16,
    /// Bound on each wait, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let extra = ["--connect-rate", "0"].map(str::to_owned).to_vec();
    let origin = SpawnedVane::start(&args.vane, args.port, &extra).await;
    let admin = origin.admin.clone();
    let key = origin.load_env().await;
    let near =
        SpawnedVane::start_relay(&origin, &origin.listen, &key, &args.vane, args.port + 10).await;
    let far =
        SpawnedVane::start_relay(&origin, &near.listen, &key, &args.vane, args.port + 20).await;
    let ca = origin.ca();
    let deadline = Duration::from_secs(args.timeout_s);

    let mut results = Vec::new();
    let mut toggles = 0;
    for (name, target) in [
        ("origin", &origin),
        ("one relay", &near),
        ("two relays", &far),
    ] {
        let endpoint: SocketAddr = target.listen.parse().expect("address");
        let fleet = Fleet::start(FleetSpec {
            endpoint,
            fallbacks: Vec::new(),
            transport: LoadTransport::Tcp,
            ca_pem: ca.clone(),
            sdk_key: key.clone(),
            clients: args.clients,
        })
        .expect("fleet");
        wait(
            &fleet,
            deadline,
            &format!("{name}: every session connected"),
            |f| f.status(0, 0).ready >= f.len(),
        )
        .await;
        let mut committed = Vec::new();
        for _ in 0..args.changes {
            toggles += 1;
            let w = admin
                .toggle("load", "load", toggles % 2 == 0)
                .await
                .expect("toggle");
            committed.push((w.at.version, w.committed_at_ns));
            tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
        }
        let last = committed.last().map_or(0, |c| c.0);
        wait(
            &fleet,
            deadline,
            &format!("{name}: every change delivered"),
            |f| f.status(last, 0).reached >= f.len(),
        )
        .await;
        let observed = fleet.finish().await;
        let (lat, missing) = delivery_latencies(std::slice::from_ref(&observed), &committed);
        results.push((name, lat, missing));
    }

    println!(
        "origin and a chain of two relays, {} TCP+TLS sessions per phase, {} changes through the origin per phase",
        args.clients, args.changes
    );
    for (name, lat, missing) in &results {
        println!("{}", latency_summary(name, lat, *missing));
    }
    let p99 = |i: usize| percentile(&results[i].1, 0.99);
    println!(
        "p99 through one relay / origin = {:.2}; through two relays / origin = {:.2}",
        p99(1) / p99(0),
        p99(2) / p99(0)
    );
}

/// Waits until `done(fleet)`, failing if a session gave up or `bound` passed.
async fn wait(fleet: &Fleet, bound: Duration, what: &str, done: impl Fn(&Fleet) -> bool) {
    let until = Instant::now() + bound;
    while !done(fleet) {
        let failed = fleet.status(0, 0).failed;
        assert!(failed == 0, "{what}: {failed} sessions gave up");
        assert!(Instant::now() < until, "{what}: not within {bound:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
