//! A session's bidirectional stream as `AsyncRead + AsyncWrite` over the shared table.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use quinn_proto as proto;
use quinn_proto::StreamId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Conn;
use super::incoming::Guard;

/// The session's bidirectional stream.
pub struct QuicStream {
    pub(super) guard: Guard,
    pub(super) id: StreamId,
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
