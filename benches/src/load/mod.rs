//! The engine of `vane-load`: opens N protocol sessions to a running server (in this process or
//! spread over worker processes), makes M flag changes through the admin API, and measures for
//! every session and change the time from the commit (the server's `committed_at_ns`, same host
//! clock) to the delta's arrival. The storm scenario then restarts the server with every session
//! connected and measures how they come back.
//!
//! Every wait is bounded by the configured timeout and every loop by a count; sessions are
//! stopped when the run ends.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use vane_core::model::{Flag, FlagValue, Serve};
use vane_server::api::client::{AdminClient, AdminError};
use vane_server::keys::KeyKind;

pub mod fleet;
pub mod worker;

use fleet::{CatchUp, Fleet, FleetSpec, Observations, Status};
use worker::{Part, Worker};

/// Which transport the sessions use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadTransport {
    /// QUIC, all sessions of a process on one UDP socket.
    Quic,
    /// TLS over TCP, one socket per session.
    Tcp,
}

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Connect, then M changes: propagation latency, memory, CPU, bytes.
    Propagation,
    /// The same, then restart the server with every session connected and measure the
    /// resumption: how long until all are back, by delta or by snapshot.
    Storm,
}

/// Restarts the server for the storm scenario: stop it the way an operator does (SIGTERM, so
/// sessions get GoAway), start it on the same data and ports, and resolve once it is ready.
pub trait Restart {
    /// Restarts, resolving once the server is ready again.
    fn restart(&mut self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The server's protocol address.
    pub endpoint: SocketAddr,
    /// The server's HTTP base URL, e.g. `http://127.0.0.1:7480`.
    pub http: String,
    /// The admin token.
    pub token: String,
    /// The CA PEM clients trust.
    pub ca_pem: Vec<u8>,
    /// The transport.
    pub transport: LoadTransport,
    /// What to measure.
    pub scenario: Scenario,
    /// How many sessions.
    pub clients: usize,
    /// How many changes.
    pub changes: usize,
    /// Pause between changes (so each change is measured on its own).
    pub interval: Duration,
    /// Bound on each phase (connecting, delivering, resuming).
    pub timeout: Duration,
    /// The server's process id, for RSS and CPU from /proc (optional).
    pub server_pid: Option<u32>,
    /// Worker processes to spread the sessions over, and the program to run as one
    /// (`vane-load` itself, which serves `--worker`). `None`: every session in this process.
    pub workers: Option<(usize, PathBuf)>,
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Sessions opened.
    pub clients: usize,
    /// The transport.
    pub transport: LoadTransport,
    /// The scenario.
    pub scenario: Scenario,
    /// Processes the sessions ran in.
    pub processes: usize,
    /// Changes made.
    pub changes: usize,
    /// Commit-to-applied latency percentiles over every (session, change).
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// The slowest.
    pub max_ms: f64,
    /// (session, change) pairs never delivered within the timeout.
    pub missing: usize,
    /// Server RSS growth from connecting the sessions, per session (needs `server_pid`).
    pub rss_per_conn_bytes: Option<u64>,
    /// Server CPU seconds used from connecting to the last delivery (needs `server_pid`).
    pub cpu_s: Option<f64>,
    /// Bytes the sessions received per change per session, during the change phase.
    pub bytes_per_change: f64,
    /// Growth of the kernel's UDP receive-buffer errors during the run (`/proc/net/snmp`).
    pub udp_rcvbuf_errors: u64,
    /// The restart, for the storm scenario.
    pub storm: Option<StormReport>,
    /// Every latency, in milliseconds, sorted (for plots).
    #[serde(skip)]
    pub latencies_ms: Vec<f64>,
}

/// How the sessions came back after a restart.
#[derive(Debug, Clone, Serialize)]
pub struct StormReport {
    /// From SIGTERM until the restarted server was ready.
    pub restart_s: f64,
    /// From the restarted server being ready until the last session had caught up.
    pub all_resumed_s: f64,
    /// Sessions that caught up again within the timeout.
    pub resumed: usize,
    /// ... whose first frame was a Delta (changes made after they left).
    pub by_delta: usize,
    /// ... whose first frame was UpToDate (back before the next change).
    pub by_up_to_date: usize,
    /// ... that needed a Snapshot.
    pub by_snapshot: usize,
    /// Share of resumed sessions that needed no snapshot.
    pub without_snapshot_pct: f64,
    /// Connection attempts during the storm (refused ones included).
    pub attempts: u64,
    /// Whether the change made right after the restart reached every session.
    pub change_after_restart_delivered: bool,
}

/// The flag every run toggles, in an environment of its own.
const LOAD_FLAG: &str = "load";

/// A boolean flag with short variant names, so its one-change delta is the 60 bytes
/// docs/BENCHMARKS.md counts per change.
fn load_flag() -> Flag {
    Flag {
        variants: [("on", true), ("off", false)]
            .map(|(name, v)| (name.to_owned(), FlagValue::Bool(v)))
            .into(),
        off_variant: "off".into(),
        fallthrough: Serve::Variant("on".into()),
        ..Flag::boolean(LOAD_FLAG, true, true)
    }
}

/// The `p` quantile (0 to 1) of a sorted sample, by nearest rank; NaN for an empty one.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Commit-to-arrival of every (session, change) of `observations`, in ms, sorted, for changes
/// committed as `(version, committed_at_ns)`; and how many never arrived.
pub fn delivery_latencies(
    observations: &[Observations],
    committed: &[(u64, u128)],
) -> (Vec<f64>, usize) {
    let (mut out, mut missing) = (Vec::new(), 0);
    for o in observations {
        for s in &o.sessions {
            for (version, at) in committed {
                match s.deltas.iter().find(|(v, _)| v >= version) {
                    Some((_, arrived)) => out.push((*arrived as f64 - *at as f64) / 1e6),
                    None => missing += 1,
                }
            }
        }
    }
    out.sort_by(f64::total_cmp);
    (out, missing)
}

/// One line: deliveries, p50/p90/p99/max of sorted `lat` (ms), and `missing`.
pub fn latency_summary(name: &str, lat: &[f64], missing: usize) -> String {
    format!(
        "{name}: {} deliveries, p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {missing} missing",
        lat.len(),
        percentile(lat, 0.5),
        percentile(lat, 0.9),
        percentile(lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN)
    )
}

/// Unix nanoseconds now, the clock `committed_at_ns` and arrivals are compared on.
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Flips the load flag; returns (version, committed_at_ns).
async fn toggle(admin: &AdminClient, env: &str, on: bool) -> Result<(u64, u128), String> {
    let written = admin
        .toggle(env, LOAD_FLAG, on)
        .await
        .map_err(|e| e.to_string())?;
    Ok((written.at.version, written.committed_at_ns))
}

/// The fleets of a run, wherever they are.
struct Parts(Vec<Part>);

impl Parts {
    async fn status(&mut self, version: u64, since_ns: u128) -> Result<Status, String> {
        let mut total = Status::default();
        for p in &mut self.0 {
            let s = p.status(version, since_ns).await?;
            total.ready += s.ready;
            total.reached += s.reached;
            total.resumed += s.resumed;
            total.failed += s.failed;
            total.attempts += s.attempts;
        }
        Ok(total)
    }

    async fn set_counting(&mut self, on: bool) -> Result<(), String> {
        for p in &mut self.0 {
            p.set_counting(on).await?;
        }
        Ok(())
    }

    /// Polls until `done` holds for the total status, within `limit`; returns whether it did,
    /// and the last status.
    async fn wait(
        &mut self,
        limit: Duration,
        version: u64,
        since_ns: u128,
        progress: &(dyn Fn(String) + Sync),
        mut done: impl FnMut(&Status) -> (bool, String),
    ) -> Result<(bool, Status), String> {
        let deadline = Instant::now() + limit;
        loop {
            let status = self.status(version, since_ns).await?;
            let (finished, line) = done(&status);
            progress(line);
            if finished || Instant::now() > deadline {
                return Ok((finished, status));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn finish(self) -> Result<Vec<Observations>, String> {
        let mut all = Vec::with_capacity(self.0.len());
        for p in self.0 {
            all.push(p.finish().await?);
        }
        Ok(all)
    }
}

/// Runs the scenario; `progress` receives one-line updates for people. The storm scenario
/// needs `restart`.
pub async fn run(
    cfg: LoadConfig,
    restart: Option<&mut dyn Restart>,
    progress: &(dyn Fn(String) + Sync),
) -> Result<LoadReport, String> {
    // The scenario decides whether there is a storm; a restart handle alone does not.
    let restart = match (cfg.scenario, restart) {
        (Scenario::Storm, None) => {
            return Err("the storm scenario restarts the server: give it a way to".into());
        }
        (Scenario::Storm, r) => r,
        (Scenario::Propagation, _) => None,
    };
    let admin = AdminClient::new(&cfg.http, &cfg.token);
    let failed = |e: AdminError| e.to_string();
    let env = format!("load-{:08x}", rand::random::<u32>());
    admin.create_env(&env).await.map_err(failed)?;
    let key = admin
        .create_key(&env, KeyKind::Server)
        .await
        .map_err(failed)?
        .secret;
    let flag = load_flag();
    let created = admin
        .put_flag(&env, LOAD_FLAG, &flag)
        .await
        .map_err(failed)?;
    let start_version = created.at.version;

    let server_pid = cfg.server_pid;
    let rss_before = server_pid.and_then(rss_bytes);
    let cpu_before = server_pid.and_then(cpu_seconds);
    let udp_before = udp_rcvbuf_errors();

    // Connect every session, spread over the workers.
    let spec = FleetSpec {
        fallbacks: Vec::new(),
        endpoint: cfg.endpoint,
        transport: cfg.transport,
        ca_pem: String::from_utf8(cfg.ca_pem.clone()).map_err(|_| "the CA PEM is not text")?,
        sdk_key: key,
        clients: cfg.clients,
    };
    let mut parts = Parts(Vec::new());
    match &cfg.workers {
        Some((n, exe)) if *n > 1 => {
            for i in 0..*n {
                let share = cfg.clients / n + usize::from(i < cfg.clients % n);
                let spec = FleetSpec {
                    fallbacks: Vec::new(),
                    clients: share,
                    ..spec.clone()
                };
                parts.0.push(Part::Remote(Worker::spawn(exe, &spec).await?));
            }
        }
        _ => parts.0.push(Part::Local(Fleet::start(spec)?)),
    }
    let processes = parts.0.len();
    let clients = cfg.clients;
    let (connected, status) = parts
        .wait(cfg.timeout, start_version, 0, progress, |s| {
            (
                s.ready == clients || s.failed > 0,
                format!("connected {}/{clients}", s.ready),
            )
        })
        .await?;
    if !connected || status.failed > 0 {
        let why = parts
            .finish()
            .await?
            .into_iter()
            .find_map(|o| o.first_failure)
            .unwrap_or_else(|| format!("not within {:?}", cfg.timeout));
        return Err(format!(
            "only {} of {clients} sessions initialized ({} gave up): {why}",
            status.ready, status.failed
        ));
    }
    let rss_connected = server_pid.and_then(rss_bytes);

    // Change the flag M times; the server says when each change committed.
    parts.set_counting(true).await?;
    let mut committed: HashMap<u64, u128> = HashMap::new();
    for i in 0..cfg.changes {
        let (version, at) = toggle(&admin, &env, i % 2 == 1).await?;
        committed.insert(version, at);
        progress(format!(
            "change {}/{} (version {version})",
            i + 1,
            cfg.changes
        ));
        tokio::time::sleep(cfg.interval).await;
    }
    let last = committed.keys().copied().max().unwrap_or(start_version);
    let (_, before_storm) = parts
        .wait(cfg.timeout, last, 0, progress, |s| {
            (
                s.reached == clients,
                format!("delivered the last change to {}/{clients}", s.reached),
            )
        })
        .await?;
    parts.set_counting(false).await?;
    let cpu_after = server_pid.and_then(cpu_seconds);

    // The storm: restart with everyone connected, change the flag once the server is back, and
    // wait until every session has caught up and holds that change.
    let mut storm_marks = None;
    if let Some(restart) = restart {
        let stopping = now_ns();
        let began = Instant::now();
        progress("restarting the server".into());
        restart.restart().await?;
        let ready_ns = now_ns();
        let restart_s = began.elapsed().as_secs_f64();
        let (version, _) = toggle(&admin, &env, cfg.changes % 2 == 1).await?;
        let (delivered, after) = parts
            .wait(cfg.timeout, version, stopping, progress, |s| {
                (
                    s.resumed == clients && s.reached == clients,
                    format!(
                        "resumed {}/{clients}, holding the new change {}/{clients}",
                        s.resumed, s.reached
                    ),
                )
            })
            .await?;
        storm_marks = Some(StormMarks {
            stopping,
            ready_ns,
            restart_s,
            attempts: after.attempts - before_storm.attempts,
            delivered,
        });
    }
    let observations = parts.finish().await?;

    // A change counts as applied by the first delta that reaches its version (a merged delta
    // carries several).
    let mut latencies = Vec::with_capacity(clients * cfg.changes);
    let mut missing = 0;
    for s in observations.iter().flat_map(|o| &o.sessions) {
        for (version, at) in &committed {
            match s.deltas.iter().find(|(v, _)| v >= version) {
                Some((_, arrived)) => latencies.push((*arrived as f64 - *at as f64) / 1e6),
                None => missing += 1,
            }
        }
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| percentile(&latencies, p);
    let per_conn = match (rss_before, rss_connected) {
        (Some(a), Some(b)) if clients > 0 => Some(b.saturating_sub(a) / clients as u64),
        _ => None,
    };
    let storm = storm_marks.map(|marks| storm_report(&observations, &marks));
    let bytes: u64 = observations.iter().map(|o| o.bytes).sum();
    Ok(LoadReport {
        clients,
        transport: cfg.transport,
        scenario: cfg.scenario,
        processes,
        changes: cfg.changes,
        p50_ms: pct(0.5),
        p90_ms: pct(0.9),
        p99_ms: pct(0.99),
        max_ms: latencies.last().copied().unwrap_or(f64::NAN),
        missing,
        rss_per_conn_bytes: per_conn,
        cpu_s: cpu_before.zip(cpu_after).map(|(a, b)| b - a),
        bytes_per_change: bytes as f64 / (cfg.changes.max(1) * clients.max(1)) as f64,
        udp_rcvbuf_errors: udp_rcvbuf_errors().saturating_sub(udp_before),
        storm,
        latencies_ms: latencies,
    })
}

/// What the coordinator noted during the storm.
struct StormMarks {
    /// When it sent SIGTERM (Unix ns).
    stopping: u128,
    /// When the server was ready again (Unix ns).
    ready_ns: u128,
    restart_s: f64,
    attempts: u64,
    delivered: bool,
}

/// Counts how the sessions caught up on their first connection after the restart began.
fn storm_report(observations: &[Observations], marks: &StormMarks) -> StormReport {
    let StormMarks {
        stopping,
        ready_ns,
        restart_s,
        attempts,
        delivered,
    } = *marks;
    let (mut by_delta, mut by_up_to_date, mut by_snapshot) = (0, 0, 0);
    let mut last = ready_ns;
    for s in observations.iter().flat_map(|o| &o.sessions) {
        let Some((at, how)) = s.catch_ups.iter().find(|(at, _)| *at > stopping) else {
            continue;
        };
        last = last.max(*at);
        match how {
            CatchUp::Delta => by_delta += 1,
            CatchUp::UpToDate => by_up_to_date += 1,
            CatchUp::Snapshot => by_snapshot += 1,
        }
    }
    let resumed = by_delta + by_up_to_date + by_snapshot;
    StormReport {
        restart_s,
        all_resumed_s: (last - ready_ns) as f64 / 1e9,
        resumed,
        by_delta,
        by_up_to_date,
        by_snapshot,
        without_snapshot_pct: if resumed == 0 {
            0.0
        } else {
            100.0 * (by_delta + by_up_to_date) as f64 / resumed as f64
        },
        attempts,
        change_after_restart_delivered: delivered,
    }
}

/// Resident set size of a process, from /proc/PID/status.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// User plus system CPU seconds of a process, from /proc/PID/stat (clock ticks of 1/100 s).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// The kernel's count of UDP datagrams dropped for a full receive buffer (/proc/net/snmp).
pub fn udp_rcvbuf_errors() -> u64 {
    let Ok(snmp) = std::fs::read_to_string("/proc/net/snmp") else {
        return 0;
    };
    let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
    let (Some(names), Some(values)) = (udp.first(), udp.get(1)) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// The latency CDF as an SVG line chart.
pub fn cdf_svg(report: &LoadReport) -> String {
    let (w, h, pad) = (640.0, 400.0, 50.0);
    let max = report.latencies_ms.last().copied().unwrap_or(1.0).max(1e-3);
    let n = report.latencies_ms.len().max(1) as f64;
    // At most ~1,000 points (a 10k-client run has 100k latencies): every step'th, and the last.
    let step = (report.latencies_ms.len() / 1000).max(1);
    let points: Vec<String> = report
        .latencies_ms
        .iter()
        .enumerate()
        .filter(|(i, _)| i % step == 0 || i + 1 == report.latencies_ms.len())
        .map(|(i, ms)| {
            let x = pad + ms / max * (w - 2.0 * pad);
            let y = h - pad - (i as f64 + 1.0) / n * (h - 2.0 * pad);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{pad}" y="20">Propagation latency CDF: {clients} {transport:?} clients, {changes} changes (p50 {p50:.1} ms, p99 {p99:.1} ms)</text>
<line x1="{pad}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{bottom}" stroke="black"/>
<text x="{pad}" y="{label_y}">0 ms</text><text x="{right}" y="{label_y}" text-anchor="end">{max:.1} ms</text>
<text x="10" y="{pad}">100%</text><text x="10" y="{bottom}">0%</text>
<polyline fill="none" stroke="#0b5fff" stroke-width="2" points="{points}"/>
</svg>
"##,
        clients = report.clients,
        transport = report.transport,
        changes = report.changes,
        p50 = report.p50_ms,
        p99 = report.p99_ms,
        bottom = h - pad,
        right = w - pad,
        label_y = h - pad + 18.0,
        points = points.join(" "),
    )
}
