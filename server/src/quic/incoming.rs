//! Connection attempts, and the hold a session keeps on its connection.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use quinn_proto as proto;
use quinn_proto::ConnectionHandle;

use super::stream::QuicStream;
use super::{Conn, Shared};

/// A connection attempt: accept or refuse it. Dropping it ignores the attempt.
pub struct Incoming {
    pub(super) shared: Arc<Shared>,
    // Boxed: it is a parameter of every session's task, kept there for the session's life.
    pub(super) incoming: Option<Box<proto::Incoming>>,
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

    /// Whether the client has shown it receives at its address (a token from a Retry, or one
    /// the server gave it before), so the address is not spoofed.
    pub fn remote_address_validated(&self) -> bool {
        self.incoming
            .as_ref()
            .is_some_and(|i| i.remote_address_validated())
    }

    /// Answers with a Retry: one stateless packet, after which the client comes back with a
    /// token that validates its address. An attempt that came with such a token already is
    /// ignored instead (a Retry may not be answered with another).
    pub fn retry(mut self) {
        if let Some(incoming) = self.incoming.take() {
            let mut st = self.shared.lock();
            let mut buf = Vec::new();
            match st.endpoint.retry(*incoming, &mut buf) {
                Ok(t) => {
                    st.pending.push(&t, &buf);
                    drop(st);
                    self.shared.driver.notify_one();
                }
                Err(e) => st.endpoint.ignore(e.into_incoming()),
            }
        }
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
pub(super) struct Guard {
    pub(super) shared: Arc<Shared>,
    pub(super) handle: usize,
    pub(super) generation: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shared.release(self.handle, self.generation);
    }
}
