//! The task that runs the sync machine: dials when it wants a connection, feeds it frames and
//! deadlines, writes what it transmits, and publishes what it emits.

use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncWriteExt as _, ReadHalf};
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::connect::{Connected, Connector, Duplex};
use super::poll::{Polled, Poller};
use super::{Command, ConnectionState, Shared};
use crate::cache::Cache;
use crate::protocol::Transport;
use crate::state::FlagSet;
use crate::sync::{DisconnectReason, Event, Output, SyncMachine};
use crate::wire::{FrameReader, ReadError, write_frame};
use tokio::sync::watch;

/// The HTTP poller, after how many failed streaming attempts it polls, and its timeout.
pub(super) type Polling = (Poller, u32, std::time::Duration);

pub(super) async fn run(
    mut machine: SyncMachine,
    mut connector: Connector,
    poller: Option<Polling>,
    shared: Arc<Shared>,
    mut commands: tokio::sync::mpsc::UnboundedReceiver<Command>,
    cache: Option<Cache>,
    cancel: CancellationToken,
) {
    // The cache is written by its own task from the latest state, so a slow disk never delays
    // a frame, and a burst of updates costs one write.
    let (cache_tx, cache_task) = match cache {
        Some(cache) => {
            let (tx, rx) = watch::channel(None);
            (Some(tx), Some(tokio::spawn(write_cache(cache, rx))))
        }
        None => (None, None),
    };
    let shared = Published {
        shared: &shared,
        cache: cache_tx.as_ref(),
    };
    let mut etag: Option<String> = None;
    loop {
        drain_offline(&mut machine, &shared);
        if machine.is_stopped() || cancel.is_cancelled() {
            break;
        }
        if !machine.wants_connect(Instant::now()) {
            let deadline = machine.poll_timeout().map(tokio::time::Instant::from);
            tokio::select! {
                _ = sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {
                    machine.on_timeout(Instant::now());
                }
                Some(command) = commands.recv() => handle(&mut machine, command, shared.shared),
                _ = cancel.cancelled() => break,
            }
            continue;
        }
        shared
            .shared
            .status
            .send_modify(|s| s.state = ConnectionState::Connecting);
        let conn = tokio::select! {
            r = connector.connect() => r,
            _ = cancel.cancelled() => break,
        };
        match conn {
            Ok(conn) => {
                debug!(transport = %conn.transport, "connected");
                shared.shared.status.send_modify(|s| s.polling = false);
                machine.on_connected(Instant::now());
                session(&mut machine, conn, &shared, &mut commands, &cancel).await;
            }
            Err(e) => {
                machine.on_connect_failed(Instant::now(), e);
                if let Some((poller, after, timeout)) = &poller
                    && machine.failures() >= *after
                {
                    tokio::select! {
                        _ = poll(&mut machine, poller, *timeout, &mut etag, &shared) => {}
                        _ = cancel.cancelled() => break,
                    }
                }
            }
        }
    }
    shared.shared.status.send_modify(|s| {
        s.state = ConnectionState::Stopped;
        s.transport = None;
    });
    drop(cache_tx);
    if let Some(task) = cache_task {
        let _ = task.await; // the last state is on disk before close() returns
    }
}

/// One poll of the HTTP snapshot; what it brings is applied and published as an update.
async fn poll(
    machine: &mut SyncMachine,
    poller: &Poller,
    timeout: std::time::Duration,
    etag: &mut Option<String>,
    shared: &Published<'_>,
) {
    // An ETag names a version the client holds; after a session it may hold a later one.
    if machine.flags().selector().is_none() {
        *etag = None;
    }
    let polled = poller.poll(etag.as_deref(), timeout).await;
    let applied = match polled {
        Ok(Polled::NotModified) => Ok(()),
        Ok(Polled::Snapshot(snapshot, tag)) => {
            *etag = tag;
            machine.on_polled(snapshot)
        }
        Err(e) => Err(e),
    };
    match applied {
        Ok(()) => {
            debug!("polled the HTTP snapshot");
            shared.shared.status.send_modify(|s| {
                s.polling = true;
                s.state = ConnectionState::Connecting;
                s.transport = None;
            });
        }
        Err(e) => {
            debug!(error = %e, "polling failed");
            shared
                .shared
                .status
                .send_modify(|s| s.last_error = Some(format!("polling: {e}")));
        }
    }
    drain_offline(machine, shared);
}

/// What the cache writer persists: the flags, and the context (JSON) they were evaluated for.
type CacheState = Option<(Arc<FlagSet>, Option<String>)>;

/// Where the driver publishes: the handle's shared state, and the cache writer.
struct Published<'a> {
    shared: &'a Shared,
    cache: Option<&'a watch::Sender<CacheState>>,
}

async fn write_cache(cache: Cache, mut rx: watch::Receiver<CacheState>) {
    while rx.changed().await.is_ok() {
        let Some((flags, context)) = rx.borrow_and_update().clone() else {
            continue;
        };
        let cache = cache.clone();
        let written =
            tokio::task::spawn_blocking(move || cache.save(&flags, context.as_deref())).await;
        if let Ok(Err(e)) = written {
            warn!(error = %e, "could not write the flag cache");
        }
    }
}

/// Runs one connection until the machine closes it, the transport fails, or the client is closed.
fn handle(machine: &mut SyncMachine, command: Command, shared: &Shared) {
    match command {
        Command::Identify(context) => machine.identify(context),
        Command::SetActive(true) => machine.resume(),
        Command::SetActive(false) => {
            machine.suspend(Instant::now());
            shared.status.send_modify(|s| {
                s.state = ConnectionState::Suspended;
                s.transport = None;
            });
        }
    }
}

async fn session(
    machine: &mut SyncMachine,
    conn: Connected,
    shared: &Published<'_>,
    commands: &mut tokio::sync::mpsc::UnboundedReceiver<Command>,
    cancel: &CancellationToken,
) {
    let transport = conn.transport;
    let Connected { stream, quic, .. } = conn;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut reader = FrameReader::new(machine.config().max_frame_len);
    loop {
        while let Some(out) = machine.poll_output() {
            match out {
                Output::Transmit(frame) => {
                    if let Err(e) = write_frame(&mut wr, &frame).await {
                        machine.on_disconnected(
                            Instant::now(),
                            DisconnectReason::Transport(with_causes(&e)),
                        );
                    }
                }
                Output::Event(event) => publish(shared, event, Some(transport), machine),
                Output::Mirror(what) => {
                    if let Some(mirror) = &shared.shared.mirror {
                        mirror.mirrored(what);
                    }
                }
                Output::Close => {}
                Output::Summarize => {
                    let counts = &shared.shared.counts;
                    if let Err(window) = machine.send_summary(counts.take(unix_ms())) {
                        counts.restore(window);
                    }
                }
            }
        }
        if !machine.is_connected() || cancel.is_cancelled() {
            break;
        }
        let deadline = machine.poll_timeout().map(tokio::time::Instant::from);
        tokio::select! {
            r = read(&mut reader, &mut rd) => {
                let now = Instant::now();
                match r {
                    Ok(Some(frame)) => machine.on_frame(now, frame),
                    Ok(None) => machine.on_disconnected(now, DisconnectReason::Transport("server closed the connection".into())),
                    Err(ReadError::Decode(e)) => machine.on_malformed(now, e.to_string()),
                    Err(ReadError::Io(e)) => machine.on_disconnected(now, DisconnectReason::Transport(with_causes(&e))),
                }
            }
            _ = sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {
                machine.on_timeout(Instant::now());
            }
                        Some(command) = commands.recv() => handle(machine, command, shared.shared),
            _ = cancel.cancelled() => break,
        }
    }
    if cancel.is_cancelled() && machine.reports_summaries() {
        // The client is closing: what was counted since the last summary goes now, if the
        // connection takes it within a second.
        let window = shared.shared.counts.take(unix_ms());
        if !window.is_empty() && machine.send_summary(window).is_ok() {
            // Written, the stream finished, and then the server's close awaited: closing a QUIC
            // connection at once would discard data not yet acknowledged.
            let flush = async {
                while let Some(out) = machine.poll_output() {
                    if let Output::Transmit(frame) = out
                        && write_frame(&mut wr, &frame).await.is_err()
                    {
                        return;
                    }
                }
                if wr.shutdown().await.is_ok() {
                    while let Ok(Some(_)) = read(&mut reader, &mut rd).await {}
                }
            };
            if tokio::time::timeout(LAST_SUMMARY, flush).await.is_err() {
                debug!("the last evaluation summary was not taken in time");
            }
        }
    }
    Connected {
        stream: rd.unsplit(wr),
        transport,
        quic,
    }
    .close();
}

async fn read(
    reader: &mut FrameReader,
    rd: &mut ReadHalf<Box<dyn Duplex>>,
) -> Result<Option<vane_proto::v1::Frame>, ReadError> {
    reader.read(rd).await
}

/// How long a closing client waits for its last evaluation summary to be written.
const LAST_SUMMARY: std::time::Duration = std::time::Duration::from_secs(1);

/// Now, in Unix milliseconds (evaluation summaries' windows).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(86_400)
}

/// Publishes events that arrive while no connection is up (backoff expiry, connect failures).
fn drain_offline(machine: &mut SyncMachine, shared: &Published<'_>) {
    while let Some(out) = machine.poll_output() {
        if let Output::Event(event) = out {
            publish(shared, event, None, machine);
        }
    }
}

fn publish(
    published: &Published<'_>,
    event: Event,
    transport: Option<Transport>,
    machine: &SyncMachine,
) {
    let shared = published.shared;
    match event {
        Event::Welcomed {
            session_id,
            environment,
            summaries,
            ..
        } => {
            debug!(%session_id, %environment, ?transport, ?summaries, "session established");
            shared.counts.set_on(summaries.is_some(), unix_ms());
            shared.status.send_modify(|s| {
                s.state = ConnectionState::Connected;
                s.transport = transport;
            });
        }
        Event::Updated(update) => {
            // Order matters. Flags first, so a listener woken by the update reads the new values.
            // The broadcast before the status: whoever sees `initialized` (and then subscribes)
            // must not receive this update as if it were a later one.
            *shared.flags.write() = machine.flags().clone();
            // Whose values these are, at once: whoever is woken by the update below (or waits
            // in `identify_and_wait`) reads it with the values.
            if shared.status.borrow().values_for.as_deref() != machine.values_context() {
                shared
                    .status
                    .send_modify(|s| s.values_for = machine.values_context().map(Into::into));
            }
            if let Some(cache) = published.cache {
                cache.send_replace(Some((
                    machine.flags().clone(),
                    machine.values_context().map(str::to_owned),
                )));
            }
            let selector = update.selector;
            let _ = shared.updates.send(update);
            shared.status.send_modify(|s| {
                s.initialized = true;
                s.selector = Some(selector);
            });
        }
        Event::Disconnected {
            reason: DisconnectReason::Suspended,
            ..
        } => {}
        Event::Disconnected {
            reason,
            reconnect_in,
        } => {
            let text = reason.to_string();
            debug!(reason = %text, ?reconnect_in, "disconnected");
            shared.status.send_modify(|s| {
                s.state = ConnectionState::Disconnected;
                s.transport = None;
                s.last_error = Some(text);
            });
        }
        Event::Stopped(fatal) => {
            warn!(error = %fatal, "stopped: the server rejected this client");
            shared.counts.set_on(false, unix_ms());
            shared.status.send_modify(|s| {
                s.state = ConnectionState::Stopped;
                s.transport = None;
                s.last_error = Some(fatal.to_string());
                s.fatal = Some(fatal);
            });
        }
    }
}

/// An error with the causes it wraps: a QUIC stream error reads "connection lost", and why
/// ("reset by peer", "timed out") is its source.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.ends_with(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}
