//! For operators, without credentials: `/healthz` (the process answers), `/readyz` (503 until
//! the state is loaded), and `/metrics` in the OpenMetrics text format, read from the hub at
//! each scrape through `prometheus-client`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::{ApiError, AppState};
use crate::api::ErrorCode;
use crate::events::EventStats;
use crate::hub::{EnvHub, Hub};
use crate::limits::Limits;

/// The operations routes.
pub fn routes(hub: Arc<Hub>, limits: Arc<Limits>, events: Arc<EventStats>) -> Router<AppState> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(HubMetrics(hub)));
    registry.register_collector(Box::new(LimitMetrics(limits)));
    registry.register_collector(Box::new(EventMetrics(events)));
    let registry = Arc::new(registry);
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(move || metrics(registry.clone())))
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.hub().is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Initializing,
            "server is loading its state",
        )
        .into_response()
    }
}

/// `/metrics`: the registry in the OpenMetrics text format.
pub(crate) async fn metrics(registry: Arc<Registry>) -> Response {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Reads the gauges from the hub at each scrape, so nothing is kept in step by hand.
#[derive(Debug)]
pub(crate) struct HubMetrics(pub(crate) Arc<Hub>);

impl Collector for HubMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let hub = &self.0;
        let ready = ConstGauge::new(i64::from(hub.is_ready()));
        ready.encode(encoder.encode_descriptor(
            "vane_ready",
            "1 once the state is loaded.",
            None,
            MetricType::Gauge,
        )?)?;

        let mut sessions = encoder.encode_descriptor(
            "vane_sessions",
            "Live protocol sessions.",
            None,
            MetricType::Gauge,
        )?;
        for (transport, n) in hub.session_counts() {
            let labels = [("transport", transport.to_string())];
            ConstGauge::new(n as i64).encode(sessions.encode_family(&labels)?)?;
        }

        let envs = hub.envs();
        per_env(
            &mut encoder,
            "vane_environment_version",
            "Current version of each environment.",
            &envs,
            |env| env.selector().version,
        )?;
        per_env(
            &mut encoder,
            "vane_environment_sessions_current",
            "Sessions whose last ack is the environment's current version.",
            &envs,
            |env| env.propagation().current as u64,
        )?;
        Ok(())
    }
}

/// What the per-source limits refused, read at each scrape.
#[derive(Debug)]
pub(crate) struct LimitMetrics(pub(crate) Arc<Limits>);

impl Collector for LimitMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut refused = encoder.encode_descriptor(
            "vane_refused",
            "Connections and admin requests refused over the limits, by reason.",
            None,
            MetricType::Counter,
        )?;
        for (why, n) in self.0.refusals() {
            let labels = [("reason", why.as_str())];
            ConstCounter::new(n).encode(refused.encode_family(&labels)?)?;
        }
        ConstCounter::new(self.0.retries()).encode(encoder.encode_descriptor(
            "vane_quic_retries",
            "QUIC attempts answered with a Retry to validate their address.",
            None,
            MetricType::Counter,
        )?)?;
        let handshakes = self.0.handshakes.in_progress() as i64;
        ConstGauge::new(handshakes).encode(encoder.encode_descriptor(
            "vane_handshakes_in_progress",
            "Protocol handshakes (TLS and QUIC) under way.",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

/// Evaluation counts and what the event pipeline took and dropped, read at each scrape.
#[derive(Debug)]
struct EventMetrics(Arc<EventStats>);

impl Collector for EventMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let stats = &self.0;
        let mut evaluations = encoder.encode_descriptor(
            "vane_evaluations",
            "Evaluations (with --events): OFREP evaluations (source ofrep) and the counts SDKs \
             report (source sdk), by environment, flag, variant and reason.",
            None,
            MetricType::Counter,
        )?;
        for ([env, flag, variant, reason, source], n) in stats.counts() {
            let labels = [
                ("env", env),
                ("flag", flag),
                ("variant", variant),
                ("reason", reason),
                ("source", source),
            ];
            ConstCounter::new(n).encode(evaluations.encode_family(&labels)?)?;
        }
        let mut events = encoder.encode_descriptor(
            "vane_evaluation_events",
            "Evaluation events: accepted into the queue, written or sent by an exporter, or \
             dropped (queue full, exporter behind or failing; an SDK count of an unknown flag \
             or variant, or over its session's summary budget).",
            None,
            MetricType::Counter,
        )?;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        for (outcome, stage, n) in [
            ("accepted", "queue", load(&stats.accepted)),
            ("dropped", "queue", load(&stats.dropped_queue)),
            ("written", "file", load(&stats.written_file)),
            ("dropped", "file", load(&stats.dropped_file)),
            ("sent", "webhook", load(&stats.sent_webhook)),
            ("dropped", "webhook", load(&stats.dropped_webhook)),
            ("dropped", "unknown_flag", load(&stats.dropped_unknown)),
            ("dropped", "session_rate", load(&stats.dropped_rate)),
        ] {
            let labels = [("outcome", outcome), ("stage", stage)];
            ConstCounter::new(n).encode(events.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// One gauge with a series per environment.
fn per_env(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    envs: &[Arc<EnvHub>],
    value: impl Fn(&EnvHub) -> u64,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for env in envs {
        let labels = [("env", env.name())];
        ConstGauge::new(value(env)).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}
