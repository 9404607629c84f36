//! QUIC serving on `quinn-proto`, with one task driving every connection of the endpoint.
//!
//! quinn's own endpoint gives every connection a task, an event channel, a transmit buffer and
//! shared state of its own: about 11 KB per idle connection on top of the protocol state (see
//! docs/BENCHMARKS.md). Here the endpoint, each connection's protocol state and the wakers of
//! the session using it sit in one table behind one lock. A single driver task receives
//! datagrams, fires timers, and sends what the connections have queued through one reusable
//! outbox; sessions read and write their stream through [`stream::QuicStream`] (`AsyncRead +
//! AsyncWrite`), which hands the connection to the driver whenever it queued something to send.
//!
//! A session's stream ends by finishing it; the connection then lingers (up to [`LINGER`]) so
//! the client can read the last frame and close the connection itself, as clients do after
//! GoAway or an error. The driver closes it if the client does not.

mod driver;
mod incoming;
mod stream;
mod timers;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn_proto as proto;
use quinn_proto::{StreamId, VarInt};
use quinn_udp as udp;
use tokio::sync::Notify;

use driver::{Driver, Outbox};
pub use incoming::Incoming;

/// How long a connection whose session ended waits for the client to close it.
pub const LINGER: Duration = Duration::from_secs(2);

/// The server's QUIC endpoint. Clones share it.
#[derive(Clone)]
pub struct Endpoint {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("quic::Endpoint")
            .field("local_addr", &self.local_addr().ok())
            .finish_non_exhaustive()
    }
}

struct Shared {
    state: Mutex<State>,
    socket: tokio::net::UdpSocket,
    udp: udp::UdpSocketState,
    /// The driver has work: a connection was marked, or the endpoint is closing.
    driver: Notify,
    /// A connection attempt was queued, or the endpoint is closing.
    incoming: Notify,
}

struct State {
    endpoint: proto::Endpoint,
    /// By `ConnectionHandle`; quinn-proto reuses the lowest free handles, so this stays dense.
    conns: Vec<Option<Box<Conn>>>,
    next_generation: u64,
    incoming: VecDeque<proto::Incoming>,
    /// Connections the driver should look at, each once (see `Conn::dirty`).
    dirty: VecDeque<usize>,
    /// Datagrams queued outside the driver (responses to refused or failed connections).
    pending: Outbox,
    /// Why connections ended that quinn-proto has forgotten but a session still holds, by
    /// generation; gone when the session lets go.
    orphans: HashMap<u64, proto::ConnectionError>,
    /// When the endpoint began closing.
    closing: Option<Instant>,
}

struct Conn {
    proto: proto::Connection,
    /// Distinguishes this connection from a later one given the same handle.
    generation: u64,
    /// The client's bidirectional stream, once it opened it.
    stream: Option<StreamId>,
    dirty: bool,
    /// A session (or the accept waiting for its stream) still holds the connection.
    held: bool,
    /// The earliest instant this connection has in the driver's timer heap.
    scheduled: Option<Instant>,
    /// Set once the session let go; then the connection closes by `linger` at the latest.
    linger: Option<Instant>,
    lost: Option<proto::ConnectionError>,
    opener: Option<Waker>,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl Conn {
    fn wake_all(&mut self) {
        for waker in [&mut self.opener, &mut self.reader, &mut self.writer] {
            if let Some(w) = waker.take() {
                w.wake();
            }
        }
    }

    fn close(&mut self, now: Instant, reason: &'static [u8]) {
        self.proto
            .close(now, VarInt::from_u32(0), Bytes::from_static(reason));
        self.lost
            .get_or_insert(proto::ConnectionError::LocallyClosed);
        self.wake_all();
    }

    /// The next instant the driver must look at this connection.
    fn deadline(&mut self) -> Option<Instant> {
        let linger = self.linger.filter(|_| !self.proto.is_closed());
        match (self.proto.poll_timeout(), linger) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn error(&self) -> Option<io::Error> {
        self.lost.clone().map(io::Error::from)
    }
}

impl State {
    /// Why a connection a session holds is no longer there.
    fn gone(&self, generation: u64) -> io::Error {
        match self.orphans.get(&generation) {
            Some(e) => e.clone().into(),
            None => io::Error::new(io::ErrorKind::ConnectionAborted, "QUIC connection closed"),
        }
    }

    fn conn(&mut self, handle: usize, generation: u64) -> Option<&mut Conn> {
        self.conns
            .get_mut(handle)?
            .as_deref_mut()
            .filter(|c| c.generation == generation)
    }

    fn mark(&mut self, handle: usize) {
        if let Some(conn) = self.conns.get_mut(handle).and_then(|c| c.as_deref_mut())
            && !conn.dirty
        {
            conn.dirty = true;
            self.dirty.push_back(handle);
        }
    }
}

impl Endpoint {
    /// Serves QUIC on `socket` with `config`; `endpoint` holds the stateless-reset key. Call
    /// [`Endpoint::drive`] (once, in a task of its own) for anything to happen.
    pub fn new(
        socket: std::net::UdpSocket,
        endpoint: proto::EndpointConfig,
        config: proto::ServerConfig,
    ) -> io::Result<Endpoint> {
        socket.set_nonblocking(true)?;
        let udp = udp::UdpSocketState::new((&socket).into())?;
        let socket = tokio::net::UdpSocket::from_std(socket)?;
        let endpoint = proto::Endpoint::new(
            Arc::new(endpoint),
            Some(Arc::new(config)),
            !udp.may_fragment(),
            None,
        );
        Ok(Endpoint {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    endpoint,
                    conns: Vec::new(),
                    next_generation: 0,
                    incoming: VecDeque::new(),
                    dirty: VecDeque::new(),
                    pending: Outbox::default(),
                    orphans: HashMap::new(),
                    closing: None,
                }),
                socket,
                udp,
                driver: Notify::new(),
                incoming: Notify::new(),
            }),
        })
    }

    /// The UDP address served.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.shared.socket.local_addr()
    }

    /// The next connection attempt; `None` once the endpoint is closing.
    pub async fn accept(&self) -> Option<Incoming> {
        loop {
            {
                let mut st = self.shared.lock();
                if st.closing.is_some() {
                    return None;
                }
                if let Some(incoming) = st.incoming.pop_front() {
                    return Some(Incoming {
                        shared: self.shared.clone(),
                        incoming: Some(Box::new(incoming)),
                    });
                }
            }
            self.shared.incoming.notified().await;
        }
    }

    /// Connections the endpoint still holds, closing ones included.
    #[cfg(test)]
    pub fn open_connections(&self) -> usize {
        self.shared.lock().endpoint.open_connections()
    }

    /// Closes every connection ("server shutdown") and ignores new ones; [`Endpoint::drive`]
    /// returns once they have closed, or after a short wait.
    pub fn close(&self) {
        let mut st = self.shared.lock();
        let now = Instant::now();
        st.closing.get_or_insert(now);
        for handle in 0..st.conns.len() {
            if let Some(conn) = st.conns[handle].as_deref_mut() {
                conn.close(now, b"server shutdown");
                st.mark(handle);
            }
        }
        // Ignored, not refused: a client whose Initial goes unanswered sends it again, and
        // when the server is restarting, the new process on the same port answers it.
        while let Some(incoming) = st.incoming.pop_front() {
            st.endpoint.ignore(incoming);
        }
        drop(st);
        self.shared.driver.notify_one();
        self.shared.incoming.notify_one();
    }

    /// Runs the endpoint: receives, fires timers, sends. Returns after [`Endpoint::close`], once
    /// every connection has closed or [`driver::CLOSE_WAIT`] has passed.
    pub async fn drive(self) {
        Driver::new(self.shared).run().await
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under the lock (a bug) interrupted work on one connection; poisoning would
        // take every other connection of the endpoint down with it, so keep serving them.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands a connection to the driver.
    fn poke(&self, mut st: MutexGuard<'_, State>, handle: usize) {
        st.mark(handle);
        drop(st);
        self.driver.notify_one();
    }

    /// The session is done with a connection: stop reading, finish writing, and close once the
    /// client has (or by [`LINGER`]).
    fn release(&self, handle: usize, generation: u64) {
        let mut st = self.lock();
        let Some(conn) = st.conn(handle, generation) else {
            st.orphans.remove(&generation);
            return;
        };
        conn.held = false;
        conn.opener = None;
        conn.reader = None;
        conn.writer = None;
        let now = Instant::now();
        match conn.stream {
            _ if conn.proto.is_closed() => {}
            Some(id) => {
                let _ = conn.proto.recv_stream(id).stop(VarInt::from_u32(0));
                let _ = conn.proto.send_stream(id).finish();
                conn.linger = Some(now + LINGER);
            }
            None => conn.close(now, b"no session stream"),
        }
        self.poke(st, handle);
    }
}

#[cfg(test)]
mod tests;
