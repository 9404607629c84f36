//! TLS on the server's TCP connections, on rustls' unbuffered API so that an idle connection
//! holds no buffers.
//!
//! `tokio-rustls` keeps a 4 KB receive buffer inside every connection for its whole life, the
//! largest single cost of an idle TLS session. Here the connection owns its buffers and frees
//! each one as soon as it is empty: received TLS bytes wait only until their record is
//! complete, decrypted bytes only until the session reads them, encrypted bytes only until the
//! socket takes them. rustls still does every cryptographic step; this module only moves bytes.
//!
//! Writes are bounded: `poll_write` accepts data only once everything encrypted before it has
//! been handed to the socket, so a client that stops reading blocks the writer (and the session
//! drops it after its write timeout) instead of growing a buffer.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes reserved for one read from the socket.
const READ_CHUNK: usize = 4096;
/// Largest plaintext put in one TLS record.
const MAX_RECORD_PLAINTEXT: usize = 16 * 1024;
/// More buffered ciphertext than the largest record (16 KiB + 256) plus one read means the peer
/// is sending something rustls will never accept as a record.
const MAX_INCOMING: usize = 16 * 1024 + 256 + READ_CHUNK;

/// A server-side TLS connection over TCP.
pub struct TlsStream {
    io: TcpStream,
    conn: UnbufferedServerConnection,
    /// Received TLS bytes not yet processed (a partial record at most, between reads).
    incoming: Vec<u8>,
    /// Decrypted application data not yet read, and how much of it was read.
    plaintext: Vec<u8>,
    plaintext_read: usize,
    /// TLS bytes to send, and how much of them was sent.
    outgoing: Vec<u8>,
    outgoing_sent: usize,
    /// The peer sent close_notify, or closed TCP.
    peer_closed: bool,
    close_notify_sent: bool,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("incoming", &self.incoming.len())
            .field("plaintext", &(self.plaintext.len() - self.plaintext_read))
            .field("outgoing", &(self.outgoing.len() - self.outgoing_sent))
            .field("peer_closed", &self.peer_closed)
            .finish_non_exhaustive()
    }
}

/// What to put on the wire once application data may be sent.
#[derive(Debug, Clone, Copy)]
enum Output<'a> {
    /// Nothing: only process what was received.
    Nothing,
    /// Application data (at most one record's worth is taken).
    Data(&'a [u8]),
    /// The close_notify alert.
    CloseNotify,
}

/// Where rustls stands after processing what was received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The handshake needs more bytes from the peer.
    Handshaking,
    /// Application data may be sent (and the output given to `process` was encrypted).
    Open,
    /// Both sides sent close_notify.
    Closed,
}

/// Performs the server side of the handshake on `io`.
pub async fn accept(io: TcpStream, config: Arc<rustls::ServerConfig>) -> io::Result<TlsStream> {
    let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
    let mut stream = TlsStream {
        io,
        conn,
        incoming: Vec::new(),
        plaintext: Vec::new(),
        plaintext_read: 0,
        outgoing: Vec::new(),
        outgoing_sent: 0,
        peer_closed: false,
        close_notify_sent: false,
    };
    std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
    Ok(stream)
}

impl TlsStream {
    /// The application protocol the handshake agreed on, if the client offered one we serve.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let (stage, _) = self.process(Output::Nothing)?;
            ready!(self.poll_send(cx))?;
            match stage {
                Stage::Open => return Poll::Ready(Ok(())),
                Stage::Closed => return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into())),
                Stage::Handshaking if self.peer_closed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed during the handshake",
                    )));
                }
                Stage::Handshaking => ready!(self.poll_receive(cx))?,
            }
        }
    }

    /// Processes every complete record received, queueing what rustls wants sent and the
    /// decrypted data; once application data may be sent, encrypts `output`. Returns the stage
    /// and how many bytes of `output`'s data were taken.
    fn process(&mut self, output: Output<'_>) -> io::Result<(Stage, usize)> {
        let TlsStream {
            conn,
            incoming,
            plaintext,
            outgoing,
            peer_closed,
            ..
        } = self;
        loop {
            let UnbufferedStatus { mut discard, state } = conn.process_tls_records(incoming);
            let mut done = None;
            match state.map_err(invalid)? {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(invalid)?;
                        discard += record.discard;
                        plaintext.extend_from_slice(record.payload);
                    }
                }
                ConnectionState::ReadEarlyData(mut early) => {
                    // Not offered by this server's configuration; drained if it ever arrives.
                    while let Some(record) = early.next_record() {
                        discard += record.map_err(invalid)?.discard;
                    }
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    append(outgoing, ENCODE_ROOM, |buf| match encode.encode(buf) {
                        Err(EncodeError::InsufficientSize(e)) => Ok(Err(e.required_size)),
                        r => r.map(Ok).map_err(invalid),
                    })?;
                }
                ConnectionState::TransmitTlsData(transmit) => {
                    // Queued in `outgoing`, in order; the caller sends it before anything else.
                    transmit.done();
                }
                ConnectionState::BlockedHandshake => done = Some((Stage::Handshaking, 0)),
                ConnectionState::PeerClosed => *peer_closed = true,
                ConnectionState::Closed => done = Some((Stage::Closed, 0)),
                ConnectionState::WriteTraffic(mut traffic) => {
                    let taken = match output {
                        Output::Nothing => 0,
                        Output::Data(data) => {
                            let data = &data[..data.len().min(MAX_RECORD_PLAINTEXT)];
                            let room = data.len() + RECORD_OVERHEAD;
                            append(outgoing, room, |buf| sized(traffic.encrypt(data, buf)))?;
                            data.len()
                        }
                        Output::CloseNotify => {
                            let room = RECORD_OVERHEAD + 2;
                            append(outgoing, room, |buf| sized(traffic.queue_close_notify(buf)))?;
                            0
                        }
                    };
                    done = Some((Stage::Open, taken));
                }
                _ => return Err(invalid("a TLS state this server does not handle")),
            }
            incoming.drain(..discard);
            if incoming.is_empty() {
                *incoming = Vec::new();
            }
            if let Some(done) = done {
                return Ok(done);
            }
        }
    }

    /// Reads what the socket has into `incoming`; Ready once something arrived or TCP ended.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.incoming.len() >= MAX_INCOMING {
            return Poll::Ready(Err(invalid("a TLS record larger than the protocol allows")));
        }
        // Read on the stack, so a connection waiting for its peer keeps no buffer.
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            ready!(self.io.poll_read_ready(cx))?;
            match self.io.try_read(&mut chunk) {
                Ok(0) => {
                    self.peer_closed = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => {
                    self.incoming.extend_from_slice(&chunk[..n]);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Hands every queued TLS byte to the socket; frees the buffer once it is all sent.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.outgoing_sent < self.outgoing.len() {
            let n = ready!(
                Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.outgoing_sent..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing_sent += n;
        }
        self.outgoing = Vec::new();
        self.outgoing_sent = 0;
        Poll::Ready(Ok(()))
    }
}

/// Lets `write` fill the end of `buf` (`room` bytes are offered first), growing it to the size
/// `write` asks for when that does not fit.
fn append(
    buf: &mut Vec<u8>,
    mut room: usize,
    mut write: impl FnMut(&mut [u8]) -> io::Result<Result<usize, usize>>,
) -> io::Result<()> {
    let start = buf.len();
    loop {
        buf.resize(start + room, 0);
        let result = write(&mut buf[start..]);
        match result {
            Ok(Ok(n)) => {
                buf.truncate(start + n);
                return Ok(());
            }
            Ok(Err(required)) if required > room => room = required,
            Ok(Err(_)) => {
                buf.truncate(start);
                return Err(invalid("TLS output did not fit the size rustls asked for"));
            }
            Err(e) => {
                buf.truncate(start);
                return Err(e);
            }
        }
    }
}

/// Room for the usual handshake message (the certificate chain fits; larger ones grow).
const ENCODE_ROOM: usize = 2048;
/// A TLS 1.3 record's overhead: header, content type, AEAD tag.
const RECORD_OVERHEAD: usize = 5 + 1 + 16;

/// An encryption's result for [`append`]: a too-small buffer becomes the size asked for.
fn sized(r: Result<usize, EncryptError>) -> io::Result<Result<usize, usize>> {
    match r {
        Err(EncryptError::InsufficientSize(e)) => Ok(Err(e.required_size)),
        r => r.map(Ok).map_err(invalid),
    }
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.plaintext_read < this.plaintext.len() {
                let available = &this.plaintext[this.plaintext_read..];
                let n = available.len().min(buf.remaining());
                buf.put_slice(&available[..n]);
                this.plaintext_read += n;
                if this.plaintext_read == this.plaintext.len() {
                    this.plaintext = Vec::new();
                    this.plaintext_read = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let (stage, _) = this.process(Output::Nothing)?;
            // What rustls wants sent in answer (a key update, an alert) goes out when it can;
            // a blocked socket must not stop reading.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if !this.plaintext.is_empty() {
                continue;
            }
            if stage == Stage::Closed || this.peer_closed {
                return Poll::Ready(Ok(())); // end of stream
            }
            ready!(this.poll_receive(cx))?;
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        // One record in flight at most: what was encrypted before must be with the socket.
        ready!(this.poll_send(cx))?;
        match this.process(Output::Data(data))? {
            (Stage::Open, n) => {
                // Sent now if the socket takes it; otherwise the next write or flush waits.
                if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(n))
            }
            (Stage::Closed, _) => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            (Stage::Handshaking, _) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "write before the TLS handshake completed",
            ))),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_send(cx))?;
        if !this.close_notify_sent {
            this.close_notify_sent = true;
            // After a close or a failed handshake there is no alert to send: just close TCP.
            if let Ok((Stage::Open, _)) = this.process(Output::CloseNotify) {
                ready!(this.poll_send(cx))?;
            }
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A server stream and a tokio-rustls client connected to it over loopback TCP.
    async fn pair() -> (
        TlsStream,
        tokio_rustls::client::TlsStream<TcpStream>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        crate::tls::ensure(dir.path()).unwrap();
        let server_config = crate::tls::server_config(dir.path()).unwrap();
        let ca = std::fs::read(dir.path().join("tls/ca.pem")).unwrap();
        let client_config = vane_core::client::tls_config(&ca).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            tokio_rustls::TlsConnector::from(client_config)
                .connect(name, tcp)
                .await
                .unwrap()
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let server = accept(tcp, server_config).await.unwrap();
        (server, client.await.unwrap(), dir)
    }

    fn idle(s: &TlsStream) -> bool {
        s.incoming.capacity() == 0 && s.plaintext.capacity() == 0 && s.outgoing.capacity() == 0
    }

    #[tokio::test]
    async fn carries_data_both_ways_in_records_of_every_size() {
        let (mut server, mut client, _dir) = pair().await;
        // Larger than several records, and not a multiple of the record size.
        let big: Vec<u8> = (0..200_003u32).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.flush().await.unwrap();
            let mut back = vec![0; sent.len()];
            client.read_exact(&mut back).await.unwrap();
            (client, back)
        });
        let mut got = vec![0; big.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, big);
        server.write_all(&got).await.unwrap();
        server.flush().await.unwrap();
        let (mut client, back) = writer.await.unwrap();
        assert_eq!(back, big);

        // close_notify from the client is a clean end of stream for the server.
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(server.read_to_end(&mut rest).await.unwrap(), 0);
        server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_buffers() {
        let (mut server, mut client, _dir) = pair().await;
        assert!(idle(&server), "after the handshake: {server:?}");
        client.write_all(b"hello").await.unwrap();
        client.flush().await.unwrap();
        let mut five = [0; 5];
        server.read_exact(&mut five).await.unwrap();
        server.write_all(b"world").await.unwrap();
        server.flush().await.unwrap();
        client.read_exact(&mut five).await.unwrap();
        assert_eq!(&five, b"world");
        assert!(idle(&server), "after an exchange: {server:?}");
    }

    #[tokio::test]
    async fn bytes_that_are_not_tls_fail_the_handshake() {
        let dir = tempfile::tempdir().unwrap();
        crate::tls::ensure(dir.path()).unwrap();
        let config = crate::tls::server_config(dir.path()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            tcp
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let err = accept(tcp, config).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        drop(peer.await.unwrap());
    }
}
