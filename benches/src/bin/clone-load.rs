//! Cloning under load: a `vane serve` this tool starts (loopback only) with N sessions connected
//! to one environment, whose flag is toggled every interval while other admin requests run
//! against a third environment. Two phases side by side: without a clone, and while an
//! environment of `--flags` flags is cloned asynchronously. Reports the clone's time, and the
//! p50/p99/max of the admin requests and of propagation to every session in each phase.
//!
//! ```sh
//! cargo build --release -p vane-server -p vane-benches --bins
//! target/release/clone-load --vane target/release/vane --flags 10000 --clients 1000
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use vane_benches::load::LoadTransport;
use vane_benches::load::fleet::{Fleet, FleetSpec};
use vane_benches::load::percentile;
use vane_benches::spawned::SpawnedVane;
use vane_server::api::JobState;
use vane_server::api::client::AdminClient;

#[derive(Debug, Parser)]
struct Args {
    /// The `vane` binary to start.
    #[arg(long)]
    vane: PathBuf,
    /// Flags in the environment that is cloned.
    #[arg(long, default_value_t = 10_000)]
    flags: usize,
    /// Sessions connected to the toggled environment.
    #[arg(long, default_value_t = 1_000)]
    clients: usize,
    /// Milliseconds between toggles (propagation is measured per toggle).
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Toggles in the phase without a clone.
    #[arg(long, default_value_t = 50)]
    changes: usize,
    /// HTTP port of the server (loopback); the protocol port is the next one.
    #[arg(long, default_value_t = 29480)]
    port: u16,
    /// Extra arguments for `vane serve` (repeat), e.g. `--server-arg=--clone-batch=200`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
}

/// Admin requests against the `other` environment, one after another, until `stop`: a write
/// (toggle) and a read (the flag list) in turn. Returns their latencies in ms.
async fn admin_traffic(admin: AdminClient, stop: Arc<AtomicBool>) -> Vec<f64> {
    let mut latencies = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) && i < 1_000_000 {
        let began = Instant::now();
        let ok = if i.is_multiple_of(2) {
            admin
                .toggle("other", "o", i.is_multiple_of(4))
                .await
                .is_ok()
        } else {
            admin.flags("other").await.is_ok()
        };
        assert!(ok, "an admin request failed");
        latencies.push(began.elapsed().as_secs_f64() * 1e3);
        i += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    latencies
}

/// Toggles the load flag every interval while `keep_going` says so; returns (version,
/// committed_at_ns) of each toggle.
async fn toggles(
    admin: &AdminClient,
    interval: Duration,
    mut keep_going: impl FnMut(usize) -> bool,
) -> Vec<(u64, u128)> {
    let mut committed = Vec::new();
    let mut n = 0;
    while keep_going(n) && n < 100_000 {
        let w = admin
            .toggle("load", "load", n % 2 == 1)
            .await
            .expect("toggle");
        committed.push((w.at.version, w.committed_at_ns));
        n += 1;
        tokio::time::sleep(interval).await;
    }
    committed
}

struct Phase {
    name: &'static str,
    toggles: Vec<(u64, u128)>,
    admin: Vec<f64>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let server = SpawnedVane::start(&args.vane, args.port, &args.server_args).await;
    let admin = server.admin.clone();

    // The environment to clone, written by 8 writers at once.
    eprintln!("writing {} flags to `big`", args.flags);
    admin.create_env("big").await.expect("big");
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (admin, n) = (admin.clone(), args.flags);
            tokio::spawn(async move {
                for i in (w..n).step_by(8) {
                    let flag = json!({"on": true, "variants": {"a": "A", "b": "B"}, "off_variant": "a",
                        "rules": [{"clauses": [{"attribute": "country", "op": "in", "values": ["de", "at"]}],
                                   "serve": {"variant": "b"}}],
                        "fallthrough": {"variant": "a"}});
                    admin.put_flag("big", &format!("flag-{i:05}"), &flag).await.expect("flag");
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    admin.create_env("other").await.expect("other");
    admin
        .put_flag(
            "other",
            "o",
            &vane_core::model::Flag::boolean("o", true, true),
        )
        .await
        .expect("o");
    let key = server.load_env().await;
    let ca = server.ca();
    let fleet = Fleet::start(FleetSpec {
        fallbacks: Vec::new(),
        endpoint: server.listen.parse().expect("address"),
        transport: LoadTransport::Tcp,
        ca_pem: ca,
        sdk_key: key,
        clients: args.clients,
    })
    .expect("fleet");
    let deadline = Instant::now() + Duration::from_secs(60);
    while fleet.status(0, 0).ready < args.clients {
        assert!(Instant::now() < deadline, "every session connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("{} sessions connected", args.clients);
    let interval = Duration::from_millis(args.interval_ms);

    // Phase 1: no clone.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn(admin_traffic(admin.clone(), stop.clone()));
    let changes = args.changes;
    let quiet = toggles(&admin, interval, |n| n < changes).await;
    stop.store(true, Ordering::Relaxed);
    let quiet_admin = traffic.await.expect("traffic");

    // Phase 2: the same while `big` is cloned.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn(admin_traffic(admin.clone(), stop.clone()));
    let began = Instant::now();
    let job = admin
        .clone_env("big", "big-copy", Some(true))
        .await
        .expect("clone");
    let answered = began.elapsed();
    let watcher = {
        let (admin, id) = (admin.clone(), job.id.clone());
        tokio::spawn(async move {
            loop {
                let j = admin.job(&id).await.expect("job");
                if j.state != JobState::Running {
                    return (j, began.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let cloning = toggles(&admin, interval, |_| !watcher.is_finished()).await;
    let (done, took) = watcher.await.expect("watcher");
    stop.store(true, Ordering::Relaxed);
    let cloning_admin = traffic.await.expect("traffic");
    assert_eq!(done.state, JobState::Done, "the clone finished: {done:?}");

    // Propagation of each toggle to every session.
    let last = cloning.last().or(quiet.last()).map_or(0, |c| c.0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while fleet.status(last, 0).reached < args.clients {
        assert!(
            Instant::now() < deadline,
            "the last toggle reached every session"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = fleet.finish().await;
    let phases = [
        Phase {
            name: "without a clone",
            toggles: quiet,
            admin: quiet_admin,
        },
        Phase {
            name: "while cloning",
            toggles: cloning,
            admin: cloning_admin,
        },
    ];
    println!(
        "clone of {} flags: answered (202) in {:.1} ms, ready after {:.2} s ({} items, {:.0} items/s)",
        args.flags,
        answered.as_secs_f64() * 1e3,
        took.as_secs_f64(),
        done.copied,
        done.copied as f64 / took.as_secs_f64()
    );
    println!(
        "| phase | toggles | propagation p50 ms | p99 ms | max ms | admin requests | admin p50 ms | p99 ms | max ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for phase in &phases {
        let commits: HashMap<u64, u128> = phase.toggles.iter().copied().collect();
        let mut latencies = Vec::new();
        for s in &seen.sessions {
            for (version, at) in &commits {
                if let Some((_, arrived)) = s.deltas.iter().find(|(v, _)| v >= version) {
                    latencies.push((*arrived as f64 - *at as f64) / 1e6);
                }
            }
        }
        latencies.sort_by(f64::total_cmp);
        let mut admin = phase.admin.clone();
        admin.sort_by(f64::total_cmp);
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {:.2} |",
            phase.name,
            phase.toggles.len(),
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            latencies.last().copied().unwrap_or(f64::NAN),
            admin.len(),
            percentile(&admin, 0.5),
            percentile(&admin, 0.99),
            admin.last().copied().unwrap_or(f64::NAN),
        );
    }
}
