//! Admin write throughput: a `vane serve` this tool starts (loopback only), on its embedded
//! SQLite store or on PostgreSQL (`--store URL`), and `--writers` concurrent writers putting
//! flags through the admin API for `--seconds` (and at most `--max-writes` in all). Each write is
//! acknowledged only after its transaction committed. Reports writes per second and the p50 /
//! p99 / max latency of a write.
//!
//! ```sh
//! cargo build --release -p vane-server -p vane-benches --bins
//! target/release/write-load --vane target/release/vane --writers 1
//! target/release/write-load --vane target/release/vane --writers 4 --store postgres://postgres@127.0.0.1:5432/bench
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use vane_benches::load::percentile;
use vane_benches::spawned::SpawnedVane;
use vane_core::model::Flag;

#[derive(Debug, Parser)]
struct Args {
    /// The `vane` binary to start.
    #[arg(long)]
    vane: PathBuf,
    /// Concurrent writers, each one request at a time.
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// How long to write.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// A bound on the writes, whatever the time.
    #[arg(long, default_value_t = 1_000_000)]
    max_writes: usize,
    /// Environments the writers share out (writer `w` writes to environment `w % envs`):
    /// writes to one environment take its versions one at a time; to several, they need not.
    #[arg(long, default_value_t = 1)]
    envs: usize,
    /// PostgreSQL URL for the server's store (an empty database); default: the embedded SQLite.
    #[arg(long)]
    store: Option<String>,
    /// HTTP port of the server (loopback); the protocol port is the next one.
    #[arg(long, default_value_t = 30480)]
    port: u16,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let extra: Vec<String> = match &args.store {
        Some(url) => vec!["--store".into(), url.clone()],
        None => Vec::new(),
    };
    let server = SpawnedVane::start(&args.vane, args.port, &extra).await;
    let admin = server.admin.clone();
    let envs = args.envs.max(1);
    for e in 0..envs {
        admin
            .create_env(&format!("writes-{e}"))
            .await
            .expect("environment");
    }

    let began = Instant::now();
    let until = began + Duration::from_secs(args.seconds);
    let per_writer = args.max_writes.div_ceil(args.writers.max(1));
    let writers: Vec<_> = (0..args.writers.max(1))
        .map(|w| {
            let admin = admin.clone();
            let env = format!("writes-{}", w % envs);
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                for n in 0..per_writer {
                    if Instant::now() >= until {
                        break;
                    }
                    // A hundred flags per writer, rewritten in turn: the table stays small.
                    let key = format!("w{w}-{}", n % 100);
                    let flag = Flag::boolean(&key, n % 2 == 0, true);
                    let t = Instant::now();
                    admin.put_flag(&env, &key, &flag).await.expect("write");
                    latencies.push(t.elapsed().as_secs_f64() * 1e3);
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for w in writers {
        latencies.extend(w.await.expect("writer"));
    }
    let elapsed = began.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let mut versions = 0;
    for e in 0..envs {
        versions += admin
            .env(&format!("writes-{e}"))
            .await
            .expect("environment")
            .at
            .version;
    }
    assert_eq!(
        versions as usize,
        latencies.len(),
        "every acknowledged write took one version"
    );
    println!(
        "store {}, {} writers into {envs} environment(s): {} writes in {elapsed:.1} s = {:.0} writes/s; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        if args.store.is_some() {
            "postgres"
        } else {
            "sqlite"
        },
        args.writers,
        latencies.len(),
        latencies.len() as f64 / elapsed,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN),
    );
}
