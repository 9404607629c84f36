//! QUIC serving on `quinn-proto`, with one task driving every connection of the endpoint.
//!
//! quinn's own endpoint gives every connection a task, an event channel, a transmit buffer and
//! shared state of its own: about 11 KB per idle connection on top of the protocol state (see
//! docs/BENCHMARKS.md). Here the endpoint, each connection's protocol state and the wakers of
//! the session using it sit in one table behind one lock. A single driver task receives
//! datagrams, fires timers, and sends what the connections have queued through one reusable
//! outbox; sessions read and write their stream through [`QuicStream`] (`AsyncRead +
//! AsyncWrite`), which hands the connection to the driver whenever it queued something to send.
//!
//! A session's stream ends by finishing it; the connection then lingers (up to [`LINGER`]) so
//! the client can read the last frame and close the connection itself, as clients do after
//! GoAway or an error. The driver closes it if the client does not.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::future::poll_fn;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto as proto;
use quinn_proto::{ConnectionHandle, DatagramEvent, Dir, Event, StreamEvent, StreamId, VarInt};
use quinn_udp as udp;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::sync::Notify;
use tracing::{debug, warn};

/// How long a connection whose session ended waits for the client to close it.
pub const LINGER: Duration = Duration::from_secs(2);

/// How long closing the endpoint waits for connections to finish closing.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Datagrams gathered before the driver lets go of the lock to send them.
const OUTBOX_DATAGRAMS: usize = 64;

/// Receive batches handled before the driver turns to timers and sending.
const RECV_BATCHES_PER_TURN: usize = 16;

/// Room for one received datagram, or one GRO train of them.
const RECV_SLOT: usize = 64 * 1024;

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

/// Datagrams waiting to be sent, in one buffer.
#[derive(Default)]
struct Outbox {
    data: Vec<u8>,
    items: Vec<Datagram>,
}

struct Datagram {
    to: SocketAddr,
    from: Option<IpAddr>,
    ecn: Option<udp::EcnCodepoint>,
    len: usize,
}

impl Outbox {
    fn push(&mut self, t: &proto::Transmit, contents: &[u8]) {
        self.data.extend_from_slice(&contents[..t.size]);
        self.items.push(Datagram {
            to: t.destination,
            from: t.src_ip,
            ecn: t.ecn.and_then(|e| udp::EcnCodepoint::from_bits(e as u8)),
            len: t.size,
        });
    }

    fn is_full(&self) -> bool {
        self.items.len() >= OUTBOX_DATAGRAMS
    }

    fn clear(&mut self) {
        self.data.clear();
        self.items.clear();
    }
}

/// Timers of every connection: a heap holding, per connection, at least its next deadline.
/// A later deadline does not add an entry; the earlier one fires and the connection is looked
/// at (finding nothing due) and rescheduled, so the heap stays about one entry per connection.
#[derive(Default)]
struct Timers(BinaryHeap<Reverse<(Instant, usize, u64)>>);

impl Timers {
    fn schedule(&mut self, handle: usize, conn: &mut Conn) {
        if let Some(at) = conn.deadline()
            && conn.scheduled.is_none_or(|s| at < s)
        {
            conn.scheduled = Some(at);
            self.0.push(Reverse((at, handle, conn.generation)));
        }
    }

    fn next(&self) -> Option<Instant> {
        self.0.peek().map(|Reverse((at, ..))| *at)
    }

    /// Marks every connection whose scheduled instant has come.
    fn expire(&mut self, now: Instant, st: &mut State) {
        while let Some(&Reverse((at, handle, generation))) = self.0.peek() {
            if at > now {
                break;
            }
            self.0.pop();
            if let Some(conn) = st.conn(handle, generation)
                && conn.scheduled == Some(at)
            {
                conn.scheduled = None;
                st.mark(handle);
            }
        }
    }
}

impl Endpoint {
    /// Serves QUIC on `socket` with `config`. Call [`Endpoint::drive`] (once, in a task of its
    /// own) for anything to happen.
    pub fn new(socket: std::net::UdpSocket, config: proto::ServerConfig) -> io::Result<Endpoint> {
        socket.set_nonblocking(true)?;
        let udp = udp::UdpSocketState::new((&socket).into())?;
        let socket = tokio::net::UdpSocket::from_std(socket)?;
        let endpoint = proto::Endpoint::new(
            Arc::new(proto::EndpointConfig::default()),
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
    /// every connection has closed or [`CLOSE_WAIT`] has passed.
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

/// A connection attempt: accept or refuse it. Dropping it ignores the attempt.
pub struct Incoming {
    shared: Arc<Shared>,
    // Boxed: it is a parameter of every session's task, kept there for the session's life.
    incoming: Option<Box<proto::Incoming>>,
}

impl Incoming {
    /// Where the attempt comes from.
    pub fn remote_address(&self) -> SocketAddr {
        // Taken only by `accept`, `refuse` and drop, which consume the attempt.
        self.incoming
            .as_ref()
            .expect("an attempt not yet accepted or refused")
            .remote_address()
    }

    /// Tells the client the server is busy.
    pub fn refuse(mut self) {
        if let Some(incoming) = self.incoming.take() {
            let mut st = self.shared.lock();
            let mut buf = Vec::new();
            let t = st.endpoint.refuse(*incoming, &mut buf);
            st.pending.push(&t, &buf);
            drop(st);
            self.shared.driver.notify_one();
        }
    }

    /// Completes the handshake and waits for the client's stream. Dropping the future closes
    /// the connection.
    pub async fn accept(mut self) -> io::Result<QuicStream> {
        let incoming = self.incoming.take().expect("an Incoming is accepted once");
        let shared = self.shared.clone();
        let guard = {
            let mut st = shared.lock();
            let mut buf = Vec::new();
            match st
                .endpoint
                .accept(*incoming, Instant::now(), &mut buf, None)
            {
                Ok((ConnectionHandle(handle), proto)) => {
                    let generation = st.next_generation;
                    st.next_generation += 1;
                    if st.conns.len() <= handle {
                        st.conns.resize_with(handle + 1, || None);
                    }
                    st.conns[handle] = Some(Box::new(Conn {
                        proto,
                        generation,
                        stream: None,
                        dirty: false,
                        held: true,
                        scheduled: None,
                        linger: None,
                        lost: None,
                        opener: None,
                        reader: None,
                        writer: None,
                    }));
                    shared.poke(st, handle);
                    Guard {
                        shared: shared.clone(),
                        handle,
                        generation,
                    }
                }
                Err(e) => {
                    if let Some(t) = e.response {
                        st.pending.push(&t, &buf);
                        drop(st);
                        shared.driver.notify_one();
                    }
                    return Err(e.cause.into());
                }
            }
        };
        let id = poll_fn(|cx| {
            let mut st = shared.lock();
            let Some(conn) = st.conn(guard.handle, guard.generation) else {
                return Poll::Ready(Err(st.gone(guard.generation)));
            };
            if let Some(id) = conn.stream {
                return Poll::Ready(Ok(id));
            }
            if let Some(e) = conn.error() {
                return Poll::Ready(Err(e));
            }
            conn.opener = Some(cx.waker().clone());
            Poll::Pending
        })
        .await?;
        Ok(QuicStream { guard, id })
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Some(incoming) = self.incoming.take() {
            self.shared.lock().endpoint.ignore(*incoming);
        }
    }
}

/// Holds a connection for a session; releasing it on drop.
struct Guard {
    shared: Arc<Shared>,
    handle: usize,
    generation: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shared.release(self.handle, self.generation);
    }
}

/// The session's bidirectional stream.
pub struct QuicStream {
    guard: Guard,
    id: StreamId,
}

impl QuicStream {
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Conn) -> (Poll<io::Result<T>>, bool),
    ) -> Poll<io::Result<T>> {
        let g = &self.guard;
        let mut st = g.shared.lock();
        let Some(conn) = st.conn(g.handle, g.generation) else {
            return Poll::Ready(Err(st.gone(g.generation)));
        };
        let (result, transmit) = f(conn);
        if transmit {
            g.shared.poke(st, g.handle);
        }
        result
    }
}

impl AsyncRead for QuicStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let id = self.id;
        self.with_conn(|conn| {
            let mut stream = conn.proto.recv_stream(id);
            let mut chunks = match stream.read(true) {
                Ok(chunks) => chunks,
                // Finished and read to the end earlier.
                Err(proto::ReadableError::ClosedStream) => return (Poll::Ready(Ok(())), false),
                Err(e) => return (Poll::Ready(Err(io::Error::other(e))), false),
            };
            let mut read = false;
            let mut result = Poll::Ready(Ok(()));
            while buf.remaining() > 0 {
                match chunks.next(buf.remaining()) {
                    Ok(Some(chunk)) => {
                        buf.put_slice(&chunk.bytes);
                        read = true;
                    }
                    Ok(None) => break,
                    Err(proto::ReadError::Blocked) => {
                        if !read {
                            // `conn.lost`, not `conn.error()`: the stream borrows
                            // `conn.proto` until it is finalized.
                            result = match conn.lost.clone() {
                                Some(e) => Poll::Ready(Err(e.into())),
                                None => Poll::Pending,
                            };
                        }
                        break;
                    }
                    Err(proto::ReadError::Reset(code)) => {
                        result = Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            format!("stream reset by the client (code {code})"),
                        )));
                        break;
                    }
                }
            }
            let transmit = chunks.finalize().should_transmit();
            if result.is_pending() {
                conn.reader = Some(cx.waker().clone());
            }
            (result, transmit)
        })
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let id = self.id;
        self.with_conn(|conn| match conn.proto.send_stream(id).write(data) {
            Ok(n) => (Poll::Ready(Ok(n)), true),
            Err(proto::WriteError::Blocked) => match conn.error() {
                Some(e) => (Poll::Ready(Err(e)), false),
                None => {
                    conn.writer = Some(cx.waker().clone());
                    (Poll::Pending, false)
                }
            },
            Err(proto::WriteError::Stopped(code)) => (
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    format!("stream stopped by the client (code {code})"),
                ))),
                false,
            ),
            Err(proto::WriteError::ClosedStream) => (
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "stream already finished",
                ))),
                false,
            ),
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written data is queued in the connection and sent by the driver.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let id = self.id;
        // Finishing twice, or a stream the client stopped, leaves nothing to do.
        self.with_conn(|conn| {
            let finished = conn.proto.send_stream(id).finish().is_ok();
            (Poll::Ready(Ok(())), finished)
        })
    }
}

enum Received {
    /// Everything the socket held.
    All,
    /// The turn's share; there may be more.
    More,
    Failed,
}

/// The task that moves datagrams for every connection.
struct Driver {
    shared: Arc<Shared>,
    timers: Timers,
    out: Outbox,
    scratch: Vec<u8>,
    recv_buf: Vec<u8>,
    metas: Vec<udp::RecvMeta>,
}

impl Driver {
    fn new(shared: Arc<Shared>) -> Driver {
        Driver {
            shared,
            timers: Timers::default(),
            out: Outbox::default(),
            scratch: Vec::new(),
            recv_buf: vec![0; RECV_SLOT * udp::BATCH_SIZE],
            metas: vec![udp::RecvMeta::default(); udp::BATCH_SIZE],
        }
    }

    async fn run(mut self) {
        loop {
            let received = self.receive();
            self.process().await;
            let deadline = {
                let st = self.shared.lock();
                if let Some(since) = st.closing {
                    if st.conns.iter().all(Option::is_none) {
                        return;
                    }
                    if since.elapsed() >= CLOSE_WAIT {
                        debug!(
                            left = st.conns.iter().flatten().count(),
                            "QUIC connections still closing at exit"
                        );
                        return;
                    }
                }
                let closing_at = st.closing.map(|since| since + CLOSE_WAIT);
                [self.timers.next(), closing_at].into_iter().flatten().min()
            };
            match received {
                Received::All => {}
                Received::More => {
                    tokio::task::yield_now().await;
                    continue;
                }
                // Readiness stays set after an error: do not spin on it.
                Received::Failed => tokio::time::sleep(Duration::from_millis(50)).await,
            }
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = self.shared.socket.readable() => {
                    if let Err(e) = r {
                        warn!(error = %e, "QUIC socket failed; the endpoint stops");
                        return;
                    }
                }
                _ = self.shared.driver.notified() => {}
                _ = sleep => {}
            }
        }
    }

    /// Reads what the socket holds, a bounded number of batches.
    fn receive(&mut self) -> Received {
        let shared = self.shared.clone();
        for _ in 0..RECV_BATCHES_PER_TURN {
            // On the stack: no allocation per batch.
            let mut slots = self.recv_buf.chunks_mut(RECV_SLOT);
            let mut iovs: [IoSliceMut<'_>; udp::BATCH_SIZE] = std::array::from_fn(|_| {
                IoSliceMut::new(slots.next().expect("the buffer holds BATCH_SIZE slots"))
            });
            let got = shared.socket.try_io(Interest::READABLE, || {
                shared
                    .udp
                    .recv((&shared.socket).into(), &mut iovs, &mut self.metas)
            });
            let n = match got {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Received::All,
                // ICMP errors surface here; QUIC treats them as unreliable, and so do we.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => continue,
                Err(e) => {
                    warn!(error = %e, "receiving QUIC datagrams failed");
                    return Received::Failed;
                }
            };
            let now = Instant::now();
            let mut st = shared.lock();
            for (meta, buf) in self.metas.iter().zip(iovs.iter()).take(n) {
                let mut data = BytesMut::from(&buf[..meta.len]);
                while !data.is_empty() {
                    let datagram = data.split_to(meta.stride.min(data.len()));
                    self.scratch.clear();
                    let ecn = meta
                        .ecn
                        .and_then(|e| proto::EcnCodepoint::from_bits(e as u8));
                    let event = st.endpoint.handle(
                        now,
                        meta.addr,
                        meta.dst_ip,
                        ecn,
                        datagram,
                        &mut self.scratch,
                    );
                    match event {
                        Some(DatagramEvent::ConnectionEvent(ConnectionHandle(h), event)) => {
                            if let Some(conn) = st.conns.get_mut(h).and_then(|c| c.as_deref_mut()) {
                                conn.proto.handle_event(event);
                                st.mark(h);
                            }
                        }
                        Some(DatagramEvent::NewConnection(incoming)) => {
                            if st.closing.is_some() {
                                st.endpoint.ignore(incoming); // as in `Endpoint::close`
                            } else {
                                st.incoming.push_back(incoming);
                                shared.incoming.notify_one();
                            }
                        }
                        Some(DatagramEvent::Response(t)) => st.pending.push(&t, &self.scratch),
                        None => {}
                    }
                }
            }
        }
        Received::More
    }

    /// Fires due timers, then lets every marked connection act: transmit, tell the endpoint,
    /// wake its session. Sends between rounds, without the lock.
    async fn process(&mut self) {
        let shared = self.shared.clone();
        let mut first = true;
        loop {
            let done = {
                let now = Instant::now();
                let mut st = shared.lock();
                if first {
                    self.timers.expire(now, &mut st);
                    first = false;
                }
                std::mem::swap(&mut self.out, &mut st.pending);
                while !self.out.is_full() {
                    let Some(handle) = st.dirty.pop_front() else {
                        break;
                    };
                    if self.drive_conn(&mut st, handle, now) {
                        st.mark(handle);
                    }
                }
                st.dirty.is_empty()
            };
            self.flush().await;
            if done {
                return;
            }
        }
    }

    /// One connection's turn; true if it has more to send than the outbox took.
    fn drive_conn(&mut self, st: &mut State, handle: usize, now: Instant) -> bool {
        let State {
            endpoint,
            conns,
            orphans,
            ..
        } = st;
        let Some(conn) = conns.get_mut(handle).and_then(|c| c.as_deref_mut()) else {
            return false;
        };
        conn.dirty = false;
        if conn.proto.poll_timeout().is_some_and(|at| at <= now) {
            conn.proto.handle_timeout(now);
        }
        if conn.linger.is_some_and(|at| at <= now) && !conn.proto.is_closed() {
            conn.close(now, b"session ended");
        }
        let mut more = false;
        loop {
            if self.out.is_full() {
                more = true;
                break;
            }
            self.scratch.clear();
            match conn.proto.poll_transmit(now, 1, &mut self.scratch) {
                Some(t) => self.out.push(&t, &self.scratch),
                None => break,
            }
        }
        while let Some(event) = conn.proto.poll_endpoint_events() {
            if let Some(event) = endpoint.handle_event(ConnectionHandle(handle), event) {
                conn.proto.handle_event(event);
                more = true;
            }
        }
        while let Some(event) = conn.proto.poll() {
            match event {
                Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                    if conn.stream.is_none() {
                        conn.stream = conn.proto.streams().accept(Dir::Bi);
                    }
                    if let Some(w) = conn.opener.take() {
                        w.wake();
                    }
                }
                Event::Stream(StreamEvent::Readable { .. }) => {
                    if let Some(w) = conn.reader.take() {
                        w.wake();
                    }
                }
                Event::Stream(StreamEvent::Writable { .. } | StreamEvent::Stopped { .. }) => {
                    if let Some(w) = conn.writer.take() {
                        w.wake();
                    }
                }
                Event::ConnectionLost { reason } => {
                    debug!(peer = %conn.proto.remote_address(), %reason, "QUIC connection lost");
                    conn.lost.get_or_insert(reason);
                    conn.wake_all();
                }
                _ => {}
            }
        }
        if conn.proto.is_drained() {
            // The endpoint has forgotten the handle (the Drained event above); so do we, keeping
            // the reason for a session that still holds the connection.
            conn.wake_all();
            if conn.held {
                let reason = conn.lost.take();
                orphans.insert(
                    conn.generation,
                    reason.unwrap_or(proto::ConnectionError::LocallyClosed),
                );
            }
            conns[handle] = None;
            return false;
        }
        self.timers.schedule(handle, conn);
        more
    }

    async fn flush(&mut self) {
        let shared = &self.shared;
        let mut offset = 0;
        for d in &self.out.items {
            let t = udp::Transmit {
                destination: d.to,
                ecn: d.ecn,
                contents: &self.out.data[offset..offset + d.len],
                segment_size: None,
                src_ip: d.from,
            };
            offset += d.len;
            loop {
                let sent = shared.socket.try_io(Interest::WRITABLE, || {
                    shared.udp.send((&shared.socket).into(), &t)
                });
                match sent {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if shared.socket.writable().await.is_err() {
                            break;
                        }
                    }
                    // `send` logs and swallows the errors a datagram may meet; what is left
                    // is the socket itself failing. QUIC retransmits what is lost.
                    Err(e) => {
                        debug!(error = %e, "sending a QUIC datagram failed");
                        break;
                    }
                }
            }
        }
        self.out.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A driven endpoint on loopback and a quinn client endpoint trusting it.
    struct Pair {
        server: Endpoint,
        driver: tokio::task::JoinHandle<()>,
        client: quinn::Endpoint,
        client_config: quinn::ClientConfig,
        _dir: tempfile::TempDir,
    }

    fn pair(linger_idle: Duration) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        crate::tls::ensure(dir.path()).unwrap();
        let tls = crate::tls::server_config(dir.path()).unwrap();
        let crypto = proto::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let mut config = proto::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = proto::TransportConfig::default();
        transport.max_idle_timeout(Some(proto::IdleTimeout::try_from(linger_idle).unwrap()));
        config.transport_config(Arc::new(transport));
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let server = Endpoint::new(socket, config).unwrap();
        let driver = tokio::spawn(server.clone().drive());

        let ca = std::fs::read(dir.path().join("tls/ca.pem")).unwrap();
        let tls = vane_core::client::tls_config(&ca).unwrap();
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let client_config = quinn::ClientConfig::new(Arc::new(crypto));
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        Pair {
            server,
            driver,
            client,
            client_config,
            _dir: dir,
        }
    }

    impl Pair {
        async fn connect(&self) -> quinn::Connection {
            let addr = self.server.local_addr().unwrap();
            self.client
                .connect_with(self.client_config.clone(), addr, "localhost")
                .unwrap()
                .await
                .unwrap()
        }

        /// A client connection with its stream open (it wrote "hello", which the server read)
        /// and the server's side of it.
        async fn session(
            &self,
        ) -> (
            quinn::Connection,
            quinn::SendStream,
            quinn::RecvStream,
            QuicStream,
        ) {
            let client = async {
                let conn = self.connect().await;
                let (mut send, recv) = conn.open_bi().await.unwrap();
                send.write_all(b"hello").await.unwrap();
                (conn, send, recv)
            };
            let server = async { self.server.accept().await.unwrap().accept().await.unwrap() };
            let ((conn, send, recv), mut stream) = tokio::join!(client, server);
            let mut hello = [0; 5];
            stream.read_exact(&mut hello).await.unwrap();
            assert_eq!(&hello, b"hello");
            (conn, send, recv, stream)
        }

        /// Waits (bounded) until the server holds no connection.
        async fn until_empty(&self) {
            for _ in 0..500 {
                let ours_empty = {
                    let st = self.server.shared.lock();
                    st.conns.iter().all(Option::is_none) && st.orphans.is_empty()
                };
                if self.server.open_connections() == 0 && ours_empty {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!(
                "the server still holds {} connections",
                self.server.open_connections()
            );
        }
    }

    /// The reason the server gave when it closed `conn`.
    async fn closed_by_server(conn: &quinn::Connection) -> Vec<u8> {
        match conn.closed().await {
            quinn::ConnectionError::ApplicationClosed(close) => close.reason.to_vec(),
            other => panic!("expected the server to close the connection, got {other}"),
        }
    }

    #[tokio::test]
    async fn carries_a_stream_both_ways_past_flow_control_and_ends_it() {
        let p = pair(Duration::from_secs(30));
        // More than the default stream receive window both ways, so writes block and resume.
        let big: Vec<u8> = (0..3_000_017u32).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let (conn, mut send, mut recv, mut server) = p.session().await;
        let client = tokio::spawn(async move {
            send.write_all(&sent).await.unwrap();
            send.finish().unwrap();
            let back = recv.read_to_end(10_000_000).await.unwrap();
            (conn, back)
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), big.len());
        assert!(
            got == big,
            "the server read other bytes than the client sent"
        );
        server.write_all(&got).await.unwrap();
        server.shutdown().await.unwrap();
        let (conn, back) = client.await.unwrap();
        assert!(
            back == big,
            "the client read other bytes than the server sent"
        );

        // The session lets go; the client closes, as it does after the last frame.
        drop(server);
        conn.close(0u32.into(), b"done");
        p.until_empty().await;
    }

    #[tokio::test]
    async fn a_connection_without_a_stream_is_closed_when_the_server_gives_up_on_it() {
        let p = pair(Duration::from_secs(30));
        let server = async {
            let incoming = p.server.accept().await.unwrap();
            tokio::time::timeout(Duration::from_millis(500), incoming.accept()).await
        };
        let (conn, waited) = tokio::join!(p.connect(), server);
        assert!(waited.is_err(), "no stream was opened, so none is accepted");
        assert_eq!(closed_by_server(&conn).await, b"no session stream");
        p.until_empty().await;
    }

    #[tokio::test]
    async fn a_client_that_does_not_close_is_closed_after_the_linger() {
        let p = pair(Duration::from_secs(30));
        let (conn, _send, mut recv, mut server) = p.session().await;
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        drop(server);
        // The last bytes arrive whole, then the stream ends; the connection stays until the
        // linger is over, and then the server closes it.
        assert_eq!(recv.read_to_end(100).await.unwrap(), b"bye");
        assert_eq!(closed_by_server(&conn).await, b"session ended");
        p.until_empty().await;
    }

    #[tokio::test]
    async fn a_silent_client_times_out_ends_the_session_with_an_error_and_is_freed() {
        // Nothing is sent either way after the hello, so the short idle timeout expires, as it
        // does for a client that vanished without a word.
        let p = pair(Duration::from_millis(300));
        let (_conn, _send, _recv, mut server) = p.session().await;
        let mut rest = [0; 1];
        let e = server.read(&mut rest).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        drop(server);
        p.until_empty().await;
    }

    #[tokio::test]
    async fn closing_the_endpoint_closes_every_connection_and_ends_the_driver() {
        let p = pair(Duration::from_secs(30));
        let mut clients = Vec::new();
        let mut sessions = Vec::new();
        for _ in 0..3 {
            let (conn, send, recv, session) = p.session().await;
            sessions.push(session);
            clients.push((conn, send, recv));
        }
        p.server.close();
        for (conn, ..) in &clients {
            assert_eq!(closed_by_server(conn).await, b"server shutdown");
        }
        let mut buf = [0; 2];
        for s in &mut sessions {
            assert!(s.read(&mut buf).await.is_err(), "the connection is closed");
        }
        drop(sessions);
        tokio::time::timeout(Duration::from_secs(10), p.driver)
            .await
            .expect("the driver ends after close")
            .unwrap();
        assert!(p.server.accept().await.is_none(), "no more connections");
    }
}
