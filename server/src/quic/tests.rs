//! The endpoint against a real quinn client on loopback.

use super::stream::QuicStream;
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
    let server = Endpoint::new(socket, proto::EndpointConfig::default(), config).unwrap();
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
