//! Evaluation events: every OFREP evaluation becomes an event, and so does every count in the
//! evaluation summaries SDKs report over the protocol (docs/PROTOCOL.md 4.8); an evaluation never
//! waits for one. The evaluating task hands its event to a bounded queue with `try_send` (atomic
//! operations only: no lock it shares with anything that does I/O); when the queue is full the
//! event is dropped and counted. One aggregator task drains the queue: it keeps the counts per
//! environment, flag, variant and reason that `/metrics` shows, and offers each event to the
//! exporters, each behind a bounded queue of its own, so a slow exporter drops its own events
//! (counted) and slows nothing else:
//!
//! - a JSON-lines file, rotated by size (`--events-file`);
//! - an HTTP webhook, sent batched (`{"events": [...]}` POSTs), retried with backoff
//!   (`--events-webhook`).
//!
//! This is the design that keeps GO Feature Flag's lock out (issue 2792 there: an exporter
//! doing network I/O under the lock the evaluations took, and 0.1% of them waiting 18 ms).

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};
use vane_core::eval::{ErrorCode, Reason};

/// What was evaluated, for whom, and what it served.
#[derive(Debug, Clone, Serialize)]
pub struct EvalEvent {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// The environment.
    pub env: Arc<str>,
    /// The flag.
    pub flag: String,
    /// The variant served; `None` when the caller's default was (an error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// OpenFeature's reason, or the error code.
    pub reason: &'static str,
    /// How many evaluations this event stands for (1 for one OFREP evaluation).
    pub count: u64,
    /// Where it was evaluated: `ofrep` (here), or `sdk` (by a client, which reported the count).
    pub source: &'static str,
    /// `sdk`: the window the client counted over, in Unix milliseconds by its clock.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_start_ms: Option<u64>,
    /// `sdk`: the end of that window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_end_ms: Option<u64>,
}

/// Unix milliseconds now.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The reason an event carries: OpenFeature's reason, or with an error its error code.
/// `DEFAULT` (no rule matched, the fallthrough was served) is OpenFeature's name; OFREP 0.3.0's
/// schema enumerates the others only, while its ADR-0006 answers `DEFAULT` itself.
pub fn event_reason(reason: Reason, error: Option<ErrorCode>) -> &'static str {
    if let Some(code) = error {
        return code.as_str();
    }
    match reason {
        Reason::Static => "STATIC",
        Reason::TargetingMatch => "TARGETING_MATCH",
        Reason::Split => "SPLIT",
        Reason::Default => "DEFAULT",
        Reason::Disabled => "DISABLED",
        Reason::Cached => "CACHED",
        _ => "UNKNOWN",
    }
}

impl EvalEvent {
    /// An event for one evaluation now.
    pub fn now(
        env: Arc<str>,
        flag: &str,
        variant: Option<&str>,
        reason: &'static str,
    ) -> EvalEvent {
        EvalEvent {
            at_ms: unix_ms(),
            env,
            flag: flag.to_owned(),
            variant: variant.map(str::to_owned),
            reason,
            count: 1,
            source: "ofrep",
            window_start_ms: None,
            window_end_ms: None,
        }
    }
}

/// One count of an evaluation summary, checked against the environment.
#[derive(Debug, Clone, Copy)]
pub struct SummaryCount<'a> {
    /// The flag.
    pub flag: &'a str,
    /// The variant served; `None` when the caller's default was.
    pub variant: Option<&'a str>,
    /// From [`event_reason`].
    pub reason: &'static str,
    /// Evaluations.
    pub count: u64,
}

/// The events' settings (`vane serve --events …`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsConfig {
    /// Whether evaluations become events at all.
    pub enabled: bool,
    /// Events the queue between evaluations and the aggregator holds.
    pub queue: usize,
    /// A JSON-lines file to append events to.
    pub file: Option<PathBuf>,
    /// The file is rotated (to `FILE.1`, `FILE.2`, …) when it grows past this.
    pub file_max_bytes: u64,
    /// Rotated files kept.
    pub file_keep: usize,
    /// A URL to POST batches of events to.
    pub webhook: Option<String>,
    /// Events per POST at most.
    pub webhook_batch: usize,
    /// A batch is sent when full or this long after its first event.
    pub webhook_interval: Duration,
    /// Events waiting for the webhook at most (while it is slow or down); more are dropped.
    pub webhook_buffer: usize,
    /// How often SDKs report their evaluation counts (at most; told in Welcome).
    pub summary_interval: Duration,
}

impl Default for EventsConfig {
    fn default() -> EventsConfig {
        EventsConfig {
            enabled: false,
            queue: 65_536,
            file: None,
            file_max_bytes: 64 * 1024 * 1024,
            file_keep: 5,
            webhook: None,
            webhook_batch: 1_000,
            webhook_interval: Duration::from_secs(1),
            webhook_buffer: 100_000,
            summary_interval: Duration::from_secs(30),
        }
    }
}

/// Counts of evaluations by environment, flag, variant, reason and source.
type Counts = HashMap<(Arc<str>, String, String, &'static str, &'static str), u64>;

/// What the metrics read.
#[derive(Debug, Default)]
pub struct EventStats {
    /// Events accepted into the queue.
    pub accepted: AtomicU64,
    /// Events dropped because the queue was full.
    pub dropped_queue: AtomicU64,
    /// Events the file exporter could not take or write.
    pub dropped_file: AtomicU64,
    /// Events the webhook exporter could not take, or gave up sending.
    pub dropped_webhook: AtomicU64,
    /// Events the webhook accepted.
    pub sent_webhook: AtomicU64,
    /// Events written to the file.
    pub written_file: AtomicU64,
    /// SDK-reported counts dropped because the flag or variant does not exist (so a client
    /// cannot grow the metrics with names of its own).
    pub dropped_unknown: AtomicU64,
    /// SDK-reported counts dropped because the session reported more than a window may hold
    /// within its summary interval.
    pub dropped_rate: AtomicU64,
    counts: Mutex<Counts>,
}

impl EventStats {
    /// The counts per environment, flag, variant, reason and source, as (labels, count).
    pub fn counts(&self) -> Vec<([String; 5], u64)> {
        let counts = self.counts.lock();
        counts
            .iter()
            .map(|((env, flag, variant, reason, source), n)| {
                (
                    [
                        env.to_string(),
                        flag.clone(),
                        variant.clone(),
                        (*reason).to_owned(),
                        (*source).to_owned(),
                    ],
                    *n,
                )
            })
            .collect()
    }
}

/// Where evaluations hand their events. Cheap to clone; disabled, it does nothing.
#[derive(Debug, Clone)]
pub struct Events {
    tx: Option<mpsc::Sender<EvalEvent>>,
    stats: Arc<EventStats>,
}

impl Events {
    /// No events.
    pub fn disabled() -> Events {
        Events {
            tx: None,
            stats: Arc::default(),
        }
    }

    /// Events handed to the returned queue and nothing else, for a caller that drains it
    /// itself (tests, fuzzing): no aggregator, no exporters.
    pub fn with_queue(capacity: usize) -> (Events, mpsc::Receiver<EvalEvent>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let events = Events {
            tx: Some(tx),
            stats: Arc::default(),
        };
        (events, rx)
    }

    /// Whether evaluations are recorded.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Hands over an event; never waits. A full queue drops it, counted.
    pub fn record(&self, event: EvalEvent) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(event) {
            Ok(()) => self.stats.accepted.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.stats.dropped_queue.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Hands over the counts of one evaluation summary a client reported for `env`: each
    /// becomes an event of source `sdk`, stamped with the server's clock and carrying the
    /// client's window. The caller has checked the counts against the environment.
    pub fn record_summary<'a>(
        &self,
        env: &str,
        window: (u64, u64),
        counts: impl IntoIterator<Item = SummaryCount<'a>>,
    ) {
        if self.tx.is_none() {
            return;
        }
        let (env, at_ms) = (Arc::<str>::from(env), unix_ms());
        for c in counts {
            self.record(EvalEvent {
                at_ms,
                env: env.clone(),
                flag: c.flag.to_owned(),
                variant: c.variant.map(str::to_owned),
                reason: c.reason,
                count: c.count,
                source: "sdk",
                window_start_ms: Some(window.0),
                window_end_ms: Some(window.1),
            });
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<EventStats> {
        &self.stats
    }

    /// Starts the aggregator and the configured exporters on `tracker`; they stop when `stop`
    /// is cancelled, after writing what they hold.
    pub fn start(
        config: &EventsConfig,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> anyhow::Result<Events> {
        if !config.enabled {
            return Ok(Events::disabled());
        }
        let stats = Arc::new(EventStats::default());
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let mut exporters = Vec::new();
        if let Some(path) = &config.file {
            let file = JsonLines::open(path, config.file_max_bytes, config.file_keep)?;
            let (etx, erx) = mpsc::channel(config.queue.max(1));
            tracker.spawn(write_file(file, erx, stats.clone()));
            exporters.push(Exporter {
                tx: etx,
                dropped: Dropped::File,
            });
        }
        if let Some(url) = &config.webhook {
            let (etx, erx) = mpsc::channel(config.webhook_buffer.max(1));
            tracker.spawn(send_webhook(
                url.clone(),
                config.webhook_batch.max(1),
                config.webhook_interval,
                erx,
                stats.clone(),
                stop.clone(),
            ));
            exporters.push(Exporter {
                tx: etx,
                dropped: Dropped::Webhook,
            });
        }
        tracker.spawn(aggregate(rx, exporters, stats.clone(), stop));
        Ok(Events {
            tx: Some(tx),
            stats,
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Dropped {
    File,
    Webhook,
}

#[derive(Debug)]
struct Exporter {
    tx: mpsc::Sender<EvalEvent>,
    dropped: Dropped,
}

/// Drains the queue: counts, and offers every event to every exporter without waiting.
async fn aggregate(
    mut rx: mpsc::Receiver<EvalEvent>,
    exporters: Vec<Exporter>,
    stats: Arc<EventStats>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(1024);
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, 1024) => n,
            _ = stop.cancelled() => {
                rx.close();
                rx.recv_many(&mut batch, usize::MAX).await
            }
        };
        if n == 0 {
            return;
        }
        {
            let mut counts = stats.counts.lock();
            for e in &batch {
                let key = (
                    e.env.clone(),
                    e.flag.clone(),
                    e.variant.clone().unwrap_or_default(),
                    e.reason,
                    e.source,
                );
                *counts.entry(key).or_insert(0) += e.count;
            }
        }
        for e in batch.drain(..) {
            for x in &exporters {
                if x.tx.try_send(e.clone()).is_err() {
                    let counter = match x.dropped {
                        Dropped::File => &stats.dropped_file,
                        Dropped::Webhook => &stats.dropped_webhook,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if stop.is_cancelled() && rx.is_empty() {
            return;
        }
    }
}

/// A JSON-lines file rotated by size.
#[derive(Debug)]
struct JsonLines {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    size: u64,
    max: u64,
    keep: usize,
}

impl JsonLines {
    fn open(path: &Path, max: u64, keep: usize) -> anyhow::Result<JsonLines> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("opening the events file {}: {e}", path.display()))?;
        let size = file.metadata().map_or(0, |m| m.len());
        Ok(JsonLines {
            path: path.to_owned(),
            file: std::io::BufWriter::new(file),
            size,
            max: max.max(1),
            keep,
        })
    }

    fn write(&mut self, events: &[EvalEvent]) -> std::io::Result<()> {
        for e in events {
            let mut line = serde_json::to_vec(e).map_err(std::io::Error::other)?;
            line.push(b'\n');
            self.file.write_all(&line)?;
            self.size += line.len() as u64;
            if self.size >= self.max {
                self.rotate()?;
            }
        }
        self.file.flush()
    }

    /// `FILE` becomes `FILE.1`, `FILE.1` becomes `FILE.2`, …; the oldest beyond `keep` goes.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        let name = |i: usize| PathBuf::from(format!("{}.{i}", self.path.display()));
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(name(self.keep));
            for i in (1..self.keep).rev() {
                let _ = std::fs::rename(name(i), name(i + 1));
            }
            std::fs::rename(&self.path, name(1))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.file = std::io::BufWriter::new(file);
        self.size = 0;
        Ok(())
    }
}

/// The file exporter: batches as they come, written and flushed off the async threads.
async fn write_file(file: JsonLines, mut rx: mpsc::Receiver<EvalEvent>, stats: Arc<EventStats>) {
    let file = Arc::new(Mutex::new(file));
    let mut batch = Vec::with_capacity(4096);
    while rx.recv_many(&mut batch, 4096).await > 0 {
        let events = std::mem::take(&mut batch);
        let n = events.len() as u64;
        let file = file.clone();
        let written = tokio::task::spawn_blocking(move || file.lock().write(&events)).await;
        match written {
            Ok(Ok(())) => stats.written_file.fetch_add(n, Ordering::Relaxed),
            Ok(Err(e)) => {
                warn!(error = %e, events = n, "writing evaluation events failed; dropped");
                stats.dropped_file.fetch_add(n, Ordering::Relaxed)
            }
            Err(e) => {
                warn!(error = %e, "the events file writer failed");
                stats.dropped_file.fetch_add(n, Ordering::Relaxed)
            }
        };
    }
}

/// What a webhook POST in flight at shutdown still gets.
const LAST_POST: Duration = Duration::from_secs(2);

#[derive(Serialize)]
struct WebhookBody<'a> {
    events: &'a [EvalEvent],
}

/// The webhook exporter: a batch is sent when full or `interval` after its first event; a
/// failed POST is retried with backoff (250 ms doubling to 30 s) while new events wait in the
/// exporter's bounded queue (over it, they are dropped by the aggregator, counted). At
/// shutdown one last attempt is made.
async fn send_webhook(
    url: String,
    batch_size: usize,
    interval: Duration,
    mut rx: mpsc::Receiver<EvalEvent>,
    stats: Arc<EventStats>,
    stop: CancellationToken,
) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(http) => http,
        Err(e) => return warn!(error = %e, "the events webhook client could not be built"),
    };
    let mut batch: Vec<EvalEvent> = Vec::with_capacity(batch_size);
    loop {
        // Fill a batch: wait for a first event, then up to `interval` for the rest.
        if batch.is_empty() {
            tokio::select! {
                n = rx.recv_many(&mut batch, batch_size) => if n == 0 { return },
                _ = stop.cancelled() => return,
            }
        }
        let deadline = tokio::time::sleep(interval);
        tokio::pin!(deadline);
        while batch.len() < batch_size {
            let room = batch_size - batch.len();
            tokio::select! {
                n = rx.recv_many(&mut batch, room) => if n == 0 { break },
                _ = &mut deadline => break,
                _ = stop.cancelled() => break,
            }
        }
        let mut backoff = Duration::from_millis(250);
        loop {
            let send = http.post(&url).json(&WebhookBody { events: &batch }).send();
            tokio::pin!(send);
            // At shutdown a POST in flight gets 2 s more, not its whole timeout.
            let sent = tokio::select! {
                r = &mut send => r,
                _ = stop.cancelled() => match tokio::time::timeout(LAST_POST, &mut send).await {
                    Ok(r) => r,
                    Err(_) => {
                        warn!(events = batch.len(), "events webhook still busy at shutdown; dropped");
                        stats.dropped_webhook.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        return;
                    }
                },
            }
            .and_then(|r| r.error_for_status());
            match sent {
                Ok(_) => {
                    stats
                        .sent_webhook
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    break;
                }
                Err(e) if stop.is_cancelled() => {
                    warn!(error = %e, events = batch.len(), "events webhook failed at shutdown; dropped");
                    stats
                        .dropped_webhook
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    debug!(error = %e, ?backoff, "events webhook failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: u64) -> EvalEvent {
        let mut e = EvalEvent::now("prod".into(), &format!("f{i}"), Some("on"), "STATIC");
        e.at_ms = i;
        e
    }

    #[test]
    fn the_file_rotates_by_size_and_keeps_so_many() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut file = JsonLines::open(&path, 400, 2).unwrap();
        let events: Vec<EvalEvent> = (0..40).map(event).collect();
        file.write(&events).unwrap();
        for p in [
            path.clone(),
            dir.path().join("events.jsonl.1"),
            dir.path().join("events.jsonl.2"),
        ] {
            let text = std::fs::read_to_string(&p).unwrap();
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(v["env"], "prod");
            }
            assert!(text.len() <= 400 + 200, "{p:?} holds {} bytes", text.len());
        }
        assert!(!dir.path().join("events.jsonl.3").exists(), "only two kept");
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_and_never_waits() {
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let config = EventsConfig {
            enabled: true,
            queue: 4,
            ..EventsConfig::default()
        };
        let events = Events::start(&config, &tracker, stop.clone()).unwrap();
        // The aggregator has not run yet (this task has not yielded): 4 fit, 6 drop.
        for i in 0..10 {
            events.record(event(i));
        }
        let stats = events.stats().clone();
        assert_eq!(stats.accepted.load(Ordering::Relaxed), 4);
        assert_eq!(stats.dropped_queue.load(Ordering::Relaxed), 6);
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        let counted: u64 = stats.counts().iter().map(|(_, n)| n).sum();
        assert_eq!(counted, 4, "what was accepted was counted");
    }

    #[tokio::test]
    async fn the_webhook_gets_batches_and_a_failed_post_is_retried() {
        use axum::http::StatusCode;
        let got = Arc::new(Mutex::new(Vec::<usize>::new()));
        let calls = Arc::new(AtomicU64::new(0));
        let (g, c) = (got.clone(), calls.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: axum::Json<serde_json::Value>| async move {
                // The first POST fails: the same batch must come again.
                if c.fetch_add(1, Ordering::Relaxed) == 0 {
                    return StatusCode::INTERNAL_SERVER_ERROR;
                }
                g.lock().push(body["events"].as_array().map_or(0, Vec::len));
                StatusCode::OK
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(axum::serve(listener, app).into_future());
        let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
        let config = EventsConfig {
            enabled: true,
            webhook: Some(url),
            webhook_batch: 25,
            webhook_interval: Duration::from_millis(10),
            ..EventsConfig::default()
        };
        let events = Events::start(&config, &tracker, stop.clone()).unwrap();
        for i in 0..100 {
            events.record(event(i));
        }
        let stats = events.stats().clone();
        tokio::time::timeout(Duration::from_secs(30), async {
            while stats.sent_webhook.load(Ordering::Relaxed) < 100 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("every event sent");
        let batches = got.lock().clone();
        assert_eq!(batches.iter().sum::<usize>(), 100, "{batches:?}");
        assert!(batches.iter().all(|&n| n <= 25), "{batches:?}");
        assert!(
            calls.load(Ordering::Relaxed) > batches.len() as u64,
            "a retry happened"
        );
        stop.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
