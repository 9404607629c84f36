//! Bad input on the protocol port: every case gets an Error frame or a bounded disconnect, and
//! other sessions keep receiving updates.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use vane_core::client::{Client, ClientError, TransportPreference};
use vane_core::sync::{Fatal, UpdateKind};
use vane_proto::codec;
use vane_proto::v1::{self as pb, ErrorCode, frame::Kind};

use vane_server::keys::KeyKind;

use crate::harness::{
    PATIENCE, TestServer, hello, next_update, raw_tls, raw_tls_offering, read_to_end, status_until,
    update_at,
};

fn error_code(frames: &[pb::Frame]) -> Option<ErrorCode> {
    frames.iter().find_map(|f| match &f.kind {
        Some(Kind::Error(e)) => Some(e.code()),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_garbage_frames_are_refused_and_others_keep_receiving() {
    let server = TestServer::start().await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    server.put_bool("prod", "f", true).await;
    let (client, mut updates) = server.client(&key, TransportPreference::Quic).await;
    next_update(&mut updates).await;

    // A length prefix far over the limit, before any Hello.
    let mut raw = raw_tls(&server).await;
    raw.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
    raw.flush().await.unwrap();
    assert_eq!(
        error_code(&read_to_end(&mut raw).await),
        Some(ErrorCode::FrameTooLarge)
    );

    // A valid Hello, then bytes that are not a protobuf Frame.
    let mut raw = raw_tls(&server).await;
    raw.write_all(&codec::encode(&hello(&key))).await.unwrap();
    raw.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    raw.flush().await.unwrap();
    let frames = read_to_end(&mut raw).await;
    assert_eq!(frames.first().map(|f| f.kind_name()), Some("Welcome"));
    assert_eq!(error_code(&frames), Some(ErrorCode::MalformedFrame));

    // Plain garbage instead of a first frame.
    let mut raw = raw_tls(&server).await;
    raw.write_all(b"\x00\x00\x00\x05hello").await.unwrap();
    raw.flush().await.unwrap();
    assert_eq!(
        error_code(&read_to_end(&mut raw).await),
        Some(ErrorCode::MalformedFrame)
    );

    // A well-formed frame that is not Hello.
    let mut raw = raw_tls(&server).await;
    raw.write_all(&codec::encode(&pb::Ack::default().into()))
        .await
        .unwrap();
    raw.flush().await.unwrap();
    assert_eq!(
        error_code(&read_to_end(&mut raw).await),
        Some(ErrorCode::ProtocolViolation)
    );

    // An unsupported protocol version.
    let mut raw = raw_tls(&server).await;
    let mut future = hello(&key);
    if let Some(Kind::Hello(h)) = &mut future.kind {
        h.protocol_version = 99;
    }
    raw.write_all(&codec::encode(&future)).await.unwrap();
    raw.flush().await.unwrap();
    assert_eq!(
        error_code(&read_to_end(&mut raw).await),
        Some(ErrorCode::UnsupportedVersion)
    );

    // The well-behaved client was not disturbed.
    let version = server.toggle("prod", "f", false).await;
    assert_eq!(
        update_at(&mut updates, version).await.kind,
        UpdateKind::Delta
    );
    assert!(!client.bool_value("f", true));
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_sdk_key_is_an_auth_error_from_the_client_api() {
    let server = TestServer::start().await;
    server.env_with_key("prod", KeyKind::Server).await;
    let config = server.client_config(
        "vane_srv_00000000000000000000000000000000",
        TransportPreference::Auto,
    );
    let client = Client::start(config).unwrap();
    let err = client.wait_for_initialization(PATIENCE).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Rejected(Fatal::Unauthenticated(_))),
        "{err}"
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mobile_key_may_not_ask_for_rules() {
    let server = TestServer::start().await;
    let key = server.env_with_key("prod", KeyKind::Mobile).await;
    let client = Client::start(server.client_config(&key, TransportPreference::Tcp)).unwrap();
    let err = client.wait_for_initialization(PATIENCE).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Rejected(Fatal::PermissionDenied(_))),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_key_ends_its_sessions() {
    let server = TestServer::start().await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    let (client, _updates) = server.client(&key, TransportPreference::Quic).await;
    let keys = server.admin.keys("prod").await.unwrap();
    let revoked = server
        .admin
        .revoke_key("prod", &keys.keys[0].id)
        .await
        .unwrap();
    assert!(revoked.revoked_at.is_some());
    let mut status = client.watch_status();
    let s = status_until(&mut status, |s| s.fatal.is_some()).await;
    assert!(matches!(s.fatal, Some(Fatal::Unauthenticated(_))), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_sends_hello_is_dropped() {
    let server =
        TestServer::start_with(|c| c.session.hello_timeout = std::time::Duration::from_millis(300))
            .await;
    let mut raw = raw_tls(&server).await;
    // Connected but silent: not a session (the gauge counts sessions past Hello).
    assert_eq!(server.sessions("tcp").await, 0);
    assert_eq!(
        error_code(&read_to_end(&mut raw).await),
        Some(ErrorCode::Timeout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_connection_that_never_said_hello() {
    // With the default 10 s Hello timeout, a silent connection must not hold shutdown up.
    let mut server = TestServer::start().await;
    let mut raw = raw_tls(&server).await;
    server.stop().await;
    let frames = read_to_end(&mut raw).await;
    assert_eq!(
        frames.iter().map(|f| f.kind_name()).collect::<Vec<_>>(),
        ["GoAway"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_does_not_negotiate_vane_1_gets_no_session() {
    let server = TestServer::start().await;
    let key = server.env_with_key("prod", KeyKind::Server).await;

    // No ALPN at all: the handshake completes, and the server says why there is no session.
    let mut raw = raw_tls_offering(&server, Vec::new()).await.unwrap();
    raw.write_all(&codec::encode(&hello(&key))).await.unwrap();
    raw.flush().await.unwrap();
    let frames = read_to_end(&mut raw).await;
    assert_eq!(frames.len(), 1, "an Error and nothing else: {frames:?}");
    assert_eq!(error_code(&frames), Some(ErrorCode::ProtocolViolation));

    // Another protocol: the TLS handshake itself fails.
    let other = raw_tls_offering(&server, vec![b"h2".to_vec()]).await;
    assert!(other.is_err(), "no_application_protocol");

    // QUIC without vane/1 fails its handshake (RFC 9001).
    let mut tls = (*vane_core::client::tls_config(&server.ca).unwrap()).clone();
    tls.alpn_protocols = Vec::new();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let attempt = endpoint
        .connect_with(
            quinn::ClientConfig::new(Arc::new(crypto)),
            server.protocol,
            "localhost",
        )
        .unwrap();
    let refused = tokio::time::timeout(PATIENCE, attempt)
        .await
        .expect("an answer in time");
    assert!(refused.is_err(), "the QUIC handshake is refused");
}

/// Far more connections at once than the 128 the standard library's listener queues: every one
/// gets its Welcome (the backlog is the kernel's maximum).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_burst_beyond_the_old_backlog_is_all_served() {
    let server = TestServer::start().await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let (addr, ca, key) = (server.protocol, server.ca.clone(), key.clone());
        burst.spawn(async move {
            let config = vane_core::client::tls_config(&ca).unwrap();
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let mut tls = tokio_rustls::TlsConnector::from(config)
                .connect("127.0.0.1".try_into().unwrap(), tcp)
                .await?;
            tls.write_all(&codec::encode(&hello(&key))).await?;
            let mut reader = vane_core::wire::FrameReader::new(codec::DEFAULT_MAX_FRAME_LEN);
            let first = reader.read(&mut tls).await.map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>((first.map(|f| f.kind_name()), tls))
        });
    }
    let mut welcomed = Vec::new();
    while let Some(done) = tokio::time::timeout(PATIENCE, burst.join_next())
        .await
        .expect("the burst is served in time")
    {
        let (first, tls) = done.unwrap().expect("connected");
        assert_eq!(first, Some("Welcome"));
        welcomed.push(tls);
    }
    assert_eq!(welcomed.len(), 1000);
    assert_eq!(server.sessions("tcp").await, 1000);
}
