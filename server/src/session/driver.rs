//! The tokio task around a [`Session`], for one QUIC stream or TLS connection: it reads the
//! stream, waits on shutdown, the session's deadline, and (once live) the environment's changes
//! and the key's grant, feeds each to the session, and writes what the session hands out, each
//! write bounded by the write timeout. Every protocol decision is the session's.
//!
//! Memory matters here: the task lives as long as the client stays connected, so nothing is
//! held across an await that an idle session does not need. Reads land on the stack and only
//! what arrived is copied out; the futures that wait on shared tokens are made once.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Sleep, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use vane_core::protocol::Transport;
use vane_core::wire::write_encoded;

use super::{End, Refusal, Session, SessionConfig, Subscription};
use crate::hub::Hub;

/// Bytes read from the stream at a time (on the stack).
const READ_CHUNK: usize = 4096;

/// Runs a session on `stream` to its end, then shuts the stream down. With a `refusal`, the
/// session is only that `Error` (one code path, so the connection's task does not grow a
/// separate state for it).
pub async fn run<S>(
    stream: &mut S,
    transport: Transport,
    hub: &Hub,
    config: &Arc<SessionConfig>,
    shutdown: &CancellationToken,
    refusal: Option<Refusal>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (id, now) = (hub.next_session_id(), Instant::now());
    let mut session = match refusal {
        None => Session::new(id, config.clone(), now),
        Some(refusal) => Session::refused(id, config.clone(), now, refusal),
    };
    session.set_transport(transport);
    // Made once: recreated on every turn they would re-register with tokens that every session
    // of the server (or of the key) waits on.
    let mut stopping = pin!(shutdown.cancelled());
    let mut timer = Timer::new();

    // Until Hello: only the stream, the Hello deadline and shutdown.
    let subscription = loop {
        if !flush(&mut session, stream, config).await {
            break None;
        }
        if let Some(subscription) = session.take_subscription() {
            break Some(subscription);
        }
        timer.arm(session.poll_timeout());
        tokio::select! {
            biased;
            _ = &mut stopping => session.handle_shutdown(Instant::now()),
            _ = timer.fired() => session.handle_timeout(Instant::now()),
            r = read_some(stream) => feed(&mut session, r, hub),
        }
    };

    if let Some(Subscription { mut changes, grant }) = subscription {
        // Counted from Hello on: a connection that never says Hello is not a session.
        let _counted = hub.count_session(transport);
        let mut revoked = pin!(grant.ended());
        while flush(&mut session, stream, config).await {
            timer.arm(session.poll_timeout());
            tokio::select! {
                biased;
                _ = &mut stopping => session.handle_shutdown(Instant::now()),
                _ = &mut revoked => session.handle_revoked(Instant::now()),
                r = changes.changed() => match r {
                    Ok(()) => {
                        // Cloned, not held: the hub publishes under its history lock.
                        let published = changes.borrow_and_update().clone();
                        session.handle_change(Instant::now(), &published);
                    }
                    // The hub holds the sender for as long as the session holds the hub.
                    Err(_) => session.handle_transport_error(Instant::now(), "the environment's change feed closed".into()),
                },
                _ = timer.fired() => session.handle_timeout(Instant::now()),
                r = read_some(stream) => feed(&mut session, r, hub),
            }
        }
    }

    let _ = timeout(config.write_timeout, stream.shutdown()).await;
    let id = session.id();
    match session.end() {
        Some(end @ End::Error(..)) => {
            warn!(session = id, %transport, reason = %end, "session ended with an error")
        }
        // Clients come and go all the time (mobile networks especially): not worth an info line.
        Some(end) => debug!(session = id, %transport, reason = %end, "session ended"),
        None => debug!(session = id, %transport, "session ended"),
    }
}

/// How long the Error frame to a client dropped for not reading may take to write.
const LAST_WORD: Duration = Duration::from_secs(1);

/// Writes everything the session has queued; whether the session goes on.
async fn flush<S: AsyncWrite + Unpin>(
    session: &mut Session,
    stream: &mut S,
    config: &SessionConfig,
) -> bool {
    let mut limit = config.write_timeout;
    while let Some(bytes) = session.poll_transmit() {
        match timeout(limit, write_encoded(stream, &bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                session.handle_transport_error(Instant::now(), e.to_string());
                return false;
            }
            // The client is not reading. The session answers with its Error frame, which gets
            // one short attempt (it is not reading, after all); if it stalls too, stop.
            Err(_) if session.end().is_some() => return false,
            Err(_) => {
                session.handle_stalled(Instant::now());
                limit = LAST_WORD.min(config.write_timeout);
            }
        }
    }
    session.end().is_none()
}

/// What a read brought: bytes, the end of the stream (empty), or an error.
fn feed(session: &mut Session, read: io::Result<Chunk>, hub: &Hub) {
    let now = Instant::now();
    match read {
        Ok(chunk) if chunk.as_slice().is_empty() => session.handle_eof(now),
        Ok(chunk) => session.handle_input(now, chunk.as_slice(), hub),
        Err(e) => session.handle_transport_error(now, e.to_string()),
    }
}

/// Reads up to this many bytes arrive without an allocation.
const INLINE: usize = 128;

/// Bytes one read brought. What clients send most (an Ack, a Fetch: under 40 bytes each) fits
/// inline, so reading them allocates nothing.
enum Chunk {
    Inline { len: usize, bytes: [u8; INLINE] },
    Heap(Bytes),
}

impl Chunk {
    fn as_slice(&self) -> &[u8] {
        match self {
            Chunk::Inline { len, bytes } => &bytes[..*len],
            Chunk::Heap(bytes) => bytes,
        }
    }
}

/// Reads what the stream has, into a buffer on the stack; copies out only what arrived (an
/// empty chunk is the end of the stream). Cancel-safe: nothing is read unless it completes.
fn read_some<S: AsyncRead + Unpin>(stream: &mut S) -> impl Future<Output = io::Result<Chunk>> + '_ {
    poll_fn(move |cx| {
        // Uninitialised: this runs at every wake-up of every session (a push polls the read
        // too), and zeroing 4 KB each time measurably slowed a fan-out to 10,000 sessions.
        let mut buf = [const { MaybeUninit::<u8>::uninit() }; READ_CHUNK];
        let mut read = ReadBuf::uninit(&mut buf);
        ready!(Pin::new(&mut *stream).poll_read(cx, &mut read))?;
        let filled = read.filled();
        Poll::Ready(Ok(if filled.len() <= INLINE {
            let mut bytes = [0u8; INLINE];
            bytes[..filled.len()].copy_from_slice(filled);
            Chunk::Inline {
                len: filled.len(),
                bytes,
            }
        } else {
            Chunk::Heap(Bytes::copy_from_slice(filled))
        }))
    })
}

/// One timer for the session's deadline, re-armed only when the deadline moves.
struct Timer {
    sleep: Pin<Box<Sleep>>,
}

impl Timer {
    fn new() -> Timer {
        Timer {
            sleep: Box::pin(tokio::time::sleep_until(far_future())),
        }
    }

    /// Moves the deadline to `at` (a session always has one until it ends).
    fn arm(&mut self, at: Option<Instant>) {
        if let Some(at) = at.map(tokio::time::Instant::from)
            && self.sleep.deadline() != at
        {
            self.sleep.as_mut().reset(at);
        }
    }

    /// Resolves when the armed deadline passes.
    async fn fired(&mut self) {
        (&mut self.sleep).await
    }
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(86_400 * 365)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vane_core::wire::FrameReader;
    use vane_proto::codec;
    use vane_proto::v1::{self as pb, ErrorCode, frame::Kind};

    #[tokio::test]
    async fn before_the_state_is_loaded_sessions_are_told_to_retry() {
        let hub = Hub::new(10); // never loaded
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let hello: pb::Frame = pb::Hello {
            protocol_version: 1,
            sdk_key: "vane_srv_any".into(),
            ..Default::default()
        }
        .into();
        client.write_all(&codec::encode(&hello)).await.unwrap();
        let shutdown = CancellationToken::new();
        let config = Arc::new(SessionConfig::default());
        run(&mut server, Transport::Tcp, &hub, &config, &shutdown, None).await;
        let frame = FrameReader::new(codec::DEFAULT_MAX_FRAME_LEN)
            .read(&mut client)
            .await
            .unwrap()
            .unwrap();
        let Some(Kind::Error(e)) = frame.kind else {
            panic!("expected an Error, got {}", frame.kind_name())
        };
        assert_eq!(e.code(), ErrorCode::Initializing);
        assert_eq!(e.retry_after_ms, 1000);
        assert_eq!(
            hub.session_counts()[1].1,
            0,
            "a refused session is never counted"
        );
    }

    /// The task's size is what every idle connection holds (docs/BENCHMARKS.md, memory per
    /// idle connection): a buffer or a future held across an await would show here.
    #[test]
    fn an_idle_session_task_stays_small() {
        let hub = Hub::new(10);
        let config = Arc::new(SessionConfig::default());
        let shutdown = CancellationToken::new();
        let mut stream = tokio::io::empty();
        let mut duplex = tokio::io::join(&mut stream, tokio::io::sink());
        let task = run(&mut duplex, Transport::Tcp, &hub, &config, &shutdown, None);
        let size = std::mem::size_of_val(&task);
        println!("session task: {size} bytes");
        // 1,184 bytes before the session became a state machine; 968 after.
        let budget = 1184;
        assert!(
            size <= budget,
            "the session task grew to {size} bytes (budget {budget})"
        );
    }
}
