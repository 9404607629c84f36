//! The task that moves datagrams for every connection: receives in batches, fires timers,
//! lets each marked connection act, and sends what they queued without holding the lock.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn_proto as proto;
use quinn_proto::{ConnectionHandle, DatagramEvent, Dir, Event, StreamEvent};
use quinn_udp as udp;
use tokio::io::Interest;
use tracing::{debug, warn};

use super::timers::Timers;
use super::{Shared, State};

/// How long closing the endpoint waits for connections to finish closing.
pub(super) const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Datagrams gathered before the driver lets go of the lock to send them.
const OUTBOX_DATAGRAMS: usize = 64;

/// Receive batches handled before the driver turns to timers and sending.
const RECV_BATCHES_PER_TURN: usize = 16;

/// Room for one received datagram, or one GRO train of them.
const RECV_SLOT: usize = 64 * 1024;

/// Datagrams waiting to be sent, in one buffer.
#[derive(Default)]
pub(super) struct Outbox {
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
    pub(super) fn push(&mut self, t: &proto::Transmit, contents: &[u8]) {
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

enum Received {
    /// Everything the socket held.
    All,
    /// The turn's share; there may be more.
    More,
    Failed,
}

/// The task that moves datagrams for every connection.
pub(super) struct Driver {
    shared: Arc<Shared>,
    timers: Timers,
    out: Outbox,
    scratch: Vec<u8>,
    recv_buf: Vec<u8>,
    metas: Vec<udp::RecvMeta>,
}

impl Driver {
    pub(super) fn new(shared: Arc<Shared>) -> Driver {
        Driver {
            shared,
            timers: Timers::default(),
            out: Outbox::default(),
            scratch: Vec::new(),
            recv_buf: vec![0; RECV_SLOT * udp::BATCH_SIZE],
            metas: vec![udp::RecvMeta::default(); udp::BATCH_SIZE],
        }
    }

    pub(super) async fn run(mut self) {
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
