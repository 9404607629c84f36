//! OFREP under load: single evaluations from many keep-alive connections against a `vane serve`
//! this tool starts (loopback only), in three runs side by side: evaluation events off; events
//! on with the file exporter; events on with a webhook whose endpoint accepts connections and
//! never answers (a stall of the whole run). Then the bulk endpoint with its full body beside the
//! 304 answer to `If-None-Match`. Prints a Markdown table: requests per second, p50, p99, p99.9
//! and the maximum latency, and what the event pipeline counted.
//!
//! ```sh
//! cargo build --release -p vane-server -p vane-benches --bins
//! target/release/ofrep-load --vane target/release/vane --seconds 10 --connections 16 --rate 10000
//! target/release/ofrep-load --vane target/release/vane --seconds 10 --connections 32   # the most
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use vane_benches::spawned::SpawnedVane;
use vane_server::api::client::AdminClient;
use vane_server::keys::KeyKind;

#[derive(Debug, Parser)]
struct Args {
    /// The `vane` binary to start.
    #[arg(long)]
    vane: PathBuf,
    /// Seconds each run measures (after a one-second warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Requests per second in all, sent on a fixed schedule (open loop). A latency counts from
    /// the send; how late each send was against its schedule is reported beside it (tokio's
    /// timer wakes to the millisecond, so up to ~1 ms is the timer; more means a connection
    /// fell behind, which closed-loop figures would hide). 0: each connection sends back to
    /// back (closed loop, the most the machine does).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// HTTP port of the servers started (loopback); the protocol port is the next one.
    #[arg(long, default_value_t = 28480)]
    port: u16,
}

async fn start(args: &Args, extra: &[String]) -> (SpawnedVane, AdminClient, String) {
    let server = SpawnedVane::start(&args.vane, args.port, extra).await;
    let admin = server.admin.clone();
    admin.create_env("load").await.expect("environment");
    let key = admin
        .create_key("load", KeyKind::Server)
        .await
        .expect("key")
        .secret;
    for i in 0..20 {
        let flag = json!({
            "on": true,
            "variants": {"a": "A", "b": "B", "c": "C"},
            "off_variant": "a",
            "rules": [{"id": "pro", "clauses": [{"attribute": "plan", "op": "in", "values": ["pro", "max"]}],
                       "serve": {"variant": "c"}}],
            "fallthrough": {"rollout": {"variants": [{"variant": "a", "weight": 50000},
                                                      {"variant": "b", "weight": 50000}]}},
        });
        admin
            .put_flag("load", &format!("flag-{i}"), &flag)
            .await
            .expect("flag");
    }
    (server, admin, key)
}

/// Latencies in microseconds, sorted.
struct Run {
    latencies: Vec<u32>,
    seconds: f64,
    statuses: Vec<u16>,
    /// How late each send was against its schedule (open loop), µs, sorted.
    slips: Vec<u32>,
}

/// `connections` tasks, each sending `request` back to back until the time is up.
async fn drive(
    args: &Args,
    make: impl Fn(&reqwest::Client, usize, u64) -> reqwest::RequestBuilder + Send + Sync + 'static,
) -> Run {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()
        .expect("client");
    let make = std::sync::Arc::new(make);
    let warm = Instant::now() + Duration::from_secs(1);
    let end = warm + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let (http, make) = (http.clone(), make.clone());
        // Open loop: this connection's requests are due every `gap`, offset so that the
        // connections interleave.
        let gap = (args.rate > 0)
            .then(|| Duration::from_secs_f64(args.connections as f64 / args.rate as f64));
        let offset = gap.map(|g| g.mul_f64(c as f64 / args.connections as f64));
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(200_000);
            let mut slips = Vec::with_capacity(200_000);
            let mut statuses = Vec::new();
            let mut n = 0u64;
            let first = Instant::now() + offset.unwrap_or_default();
            loop {
                let due = gap.map(|gap| first + gap.mul_f64(n as f64));
                if let Some(due) = due {
                    tokio::time::sleep_until(due.into()).await;
                }
                let started = Instant::now();
                if due.unwrap_or(started) >= warm {
                    slips.push(
                        started
                            .saturating_duration_since(due.unwrap_or(started))
                            .as_micros() as u32,
                    );
                }
                if started >= end {
                    break;
                }
                let answer = make(&http, c, n).send().await.expect("request answered");
                let status = answer.status().as_u16();
                let _ = answer.bytes().await;
                if started >= warm {
                    latencies.push(started.elapsed().as_micros() as u32);
                    if !statuses.contains(&status) {
                        statuses.push(status);
                    }
                }
                n += 1;
            }
            (latencies, statuses, slips)
        }));
    }
    let mut run = Run {
        latencies: Vec::new(),
        seconds: args.seconds as f64,
        statuses: Vec::new(),
        slips: Vec::new(),
    };
    for t in tasks {
        let (l, s, slips) = t.await.expect("task");
        run.latencies.extend(l);
        run.slips.extend(slips);
        for s in s {
            if !run.statuses.contains(&s) {
                run.statuses.push(s);
            }
        }
    }
    run.latencies.sort_unstable();
    run.slips.sort_unstable();
    run
}

fn quantile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

fn row(name: &str, run: &Run, note: &str) {
    let l = &run.latencies;
    let slip = if run.slips.iter().any(|&s| s > 0) {
        format!(
            "send late by p99 {:.3}, max {:.3} ms; ",
            quantile(&run.slips, 0.99),
            quantile(&run.slips, 1.0)
        )
    } else {
        String::new()
    };
    println!(
        "| {name} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:?} | {slip}{note} |",
        l.len() as f64 / run.seconds,
        quantile(l, 0.5),
        quantile(l, 0.99),
        quantile(l, 0.999),
        quantile(l, 1.0),
        run.statuses,
    );
}

async fn metric(admin: &AdminClient, prefix: &str) -> u64 {
    let text = admin.metrics().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

async fn single(args: &Args, name: &str, extra: &[String], counted: bool) {
    let (server, admin, key) = start(args, extra).await;
    let url = format!("{}/ofrep/v1/evaluate/flags/flag-7", server.http);
    let run = drive(args, move |http, c, n| {
        let plan = if n % 3 == 0 { "pro" } else { "free" };
        http.post(&url)
            .header("x-api-key", &key)
            .json(&json!({"context": {"targetingKey": format!("user-{c}-{n}"), "plan": plan}}))
    })
    .await;
    let note = if counted {
        let accepted = metric(
            &admin,
            "vane_evaluation_events_total{outcome=\"accepted\",stage=\"queue\"} ",
        )
        .await;
        let queue = metric(
            &admin,
            "vane_evaluation_events_total{outcome=\"dropped\",stage=\"queue\"} ",
        )
        .await;
        let file = metric(
            &admin,
            "vane_evaluation_events_total{outcome=\"written\",stage=\"file\"} ",
        )
        .await;
        let hook = metric(
            &admin,
            "vane_evaluation_events_total{outcome=\"dropped\",stage=\"webhook\"} ",
        )
        .await;
        format!(
            "events accepted {accepted}, dropped at the queue {queue}, written {file}, dropped by the webhook {hook}"
        )
    } else {
        String::new()
    };
    row(name, &run, &note);
    drop(server);
}

async fn bulk(args: &Args) {
    let (server, _admin, key) = start(args, &[]).await;
    let url = format!("{}/ofrep/v1/evaluate/flags", server.http);
    let body = json!({"context": {"targetingKey": "user-1", "plan": "free"}});
    let tag = reqwest::Client::new()
        .post(&url)
        .header("x-api-key", &key)
        .json(&body)
        .send()
        .await
        .expect("bulk")
        .headers()["etag"]
        .to_str()
        .expect("etag")
        .to_owned();
    let (u, k, b) = (url.clone(), key.clone(), body.clone());
    let full = drive(args, move |http, _, _| {
        http.post(&u).header("x-api-key", &k).json(&b)
    })
    .await;
    row("bulk, 20 flags, full body (200)", &full, "");
    let not_modified = drive(args, move |http, _, _| {
        http.post(&url)
            .header("x-api-key", &key)
            .header("if-none-match", &tag)
            .json(&body)
    })
    .await;
    row("bulk, If-None-Match (304)", &not_modified, "");
    drop(server);
}

/// A webhook endpoint that accepts connections and never answers.
async fn stalled_webhook() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/events", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = listener.accept().await {
            held.push(c);
        }
    });
    url
}

fn events_file(dir: &Path) -> String {
    dir.join("events.jsonl").display().to_string()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let pace = match args.rate {
        0 => "back to back".to_owned(),
        r => format!("{r} requests/s on a fixed schedule"),
    };
    println!(
        "{} connections, {pace}, {} s per run after a 1 s warm-up, 20 flags with a rule and a \
         rollout; latencies in ms",
        args.connections, args.seconds
    );
    println!();
    println!("| run | requests/s | p50 | p99 | p99.9 | max | statuses | notes |");
    println!("|---|---|---|---|---|---|---|---|");
    single(&args, "single, events off", &[], false).await;
    let files = tempfile::tempdir().expect("temp dir");
    single(
        &args,
        "single, events to a file",
        &["--events-file".into(), events_file(files.path())],
        true,
    )
    .await;
    let hook = stalled_webhook().await;
    single(
        &args,
        "single, events to a stalled webhook",
        &["--events-webhook".into(), hook],
        true,
    )
    .await;
    bulk(&args).await;
}
