//! Evaluation counts the Rust client reports over the protocol (PROTOCOL.md 4.8), through a real
//! server with events on: into the metrics and the events file, over QUIC and over TCP, and the
//! last window when the client closes.

use std::time::Duration;

use serde_json::Value;
use vane_core::client::TransportPreference;
use vane_server::keys::KeyKind;

use crate::harness::*;

/// The series of `flag`'s sdk-reported count with `variant` and `reason`.
fn sdk_series(flag: &str, variant: &str, reason: &str) -> String {
    format!(
        "vane_evaluations_total{{env=\"prod\",flag=\"{flag}\",variant=\"{variant}\",reason=\"{reason}\",source=\"sdk\"}}"
    )
}

/// Waits until /metrics shows `series` at `want` (within [`PATIENCE`]); returns the text.
async fn metrics_until(server: &TestServer, series_name: &str, want: u64) -> String {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let text = server.admin.metrics().await.unwrap();
            if series(&text, series_name) == Some(want) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{series_name} never reached {want}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_evaluation_counts_reach_the_metrics_and_the_file_over_both_transports() {
    let server = TestServer::start_with(|c| {
        c.events.enabled = true;
        c.events.file = Some(c.data_dir.join("events.jsonl"));
        c.events.summary_interval = Duration::from_secs(1);
        c.session.heartbeat = Duration::from_secs(1);
    })
    .await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    server.put_bool("prod", "banner", true).await;
    let banner = sdk_series("banner", "true", "STATIC");
    let mismatch = sdk_series("banner", "", "TYPE_MISMATCH");
    for (round, transport) in [TransportPreference::Quic, TransportPreference::Tcp]
        .into_iter()
        .enumerate()
    {
        let (client, _updates) = server.client(&key, transport).await;
        for _ in 0..7 {
            assert!(client.bool_value("banner", false));
        }
        assert_eq!(client.string_value("banner", "default"), "default");
        assert!(!client.bool_value("no-such-flag", false));
        let n = round as u64 + 1;
        let text = metrics_until(&server, &banner, 7 * n).await;
        assert_eq!(series(&text, &mismatch), Some(n), "{text}");
        client.close().await;
    }
    // The unknown flag is not in the metrics: it was dropped, and counted as dropped.
    let text = server.admin.metrics().await.unwrap();
    assert!(!text.contains("no-such-flag"), "{text}");
    let unknown = "vane_evaluation_events_total{outcome=\"dropped\",stage=\"unknown_flag\"}";
    assert_eq!(series(&text, unknown), Some(2), "{text}");
    // The file holds the same counts, each with the client's window.
    let path = server.dir.path().join("events.jsonl");
    let lines: Vec<Value> = tokio::time::timeout(PATIENCE, async {
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            if lines.len() >= 4 {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the counts written to the file");
    let served: u64 = lines
        .iter()
        .filter(|l| l["variant"] == "true")
        .map(|l| l["count"].as_u64().unwrap())
        .sum();
    assert_eq!(served, 14);
    for l in &lines {
        assert_eq!(l["source"], "sdk", "{l}");
        assert_eq!(l["env"], "prod", "{l}");
        let (start, end) = (
            l["window_start_ms"].as_u64().unwrap(),
            l["window_end_ms"].as_u64().unwrap(),
        );
        assert!(
            start <= end && end <= l["at_ms"].as_u64().unwrap() + 1_000,
            "{l}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_client_reports_what_it_counted_since_its_last_summary() {
    // An interval far longer than the test: only the close can bring the counts.
    let server = TestServer::start_with(|c| {
        c.events.enabled = true;
        c.events.summary_interval = Duration::from_secs(3_600);
    })
    .await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    server.put_bool("prod", "banner", true).await;
    server.toggle("prod", "banner", false).await;
    let off = sdk_series("banner", "false", "DISABLED");
    for (round, transport) in [TransportPreference::Quic, TransportPreference::Tcp]
        .into_iter()
        .enumerate()
    {
        let (client, _updates) = server.client(&key, transport).await;
        for _ in 0..4 {
            let _ = client.details("banner");
        }
        client.close().await;
        metrics_until(&server, &off, 4 * (round as u64 + 1)).await;
    }
}
