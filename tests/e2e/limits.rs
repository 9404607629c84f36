//! Per-source limits: a source over its connection rate is told `RATE_LIMITED` with when to come
//! back, one with too many handshakes open is closed before TLS, QUIC asks unvalidated
//! addresses for a Retry under load, and a source guessing admin tokens is answered `429`. Other
//! sources (127.0.0.2 is another address on loopback) are served meanwhile.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use vane_core::client::TransportPreference;
use vane_core::protocol::Transport;
use vane_proto::codec;
use vane_proto::v1::{ErrorCode, frame::Kind};
use vane_server::api::ErrorCode as ApiCode;
use vane_server::api::client::AdminClient;
use vane_server::keys::KeyKind;
use vane_server::limits::Rate;

use crate::harness::*;

const OTHER: [u8; 4] = [127, 0, 0, 2];

/// A TCP connection to `to` from `from` (any port).
async fn tcp_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::from((IpAddr::from(from), 0)))
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// The first frame the server sends on a TLS connection from `from` that says Hello with `key`.
async fn first_frame(server: &TestServer, from: [u8; 4], key: &str) -> Kind {
    let config = vane_core::client::tls_config(&server.ca).unwrap();
    let tcp = tcp_from(from, server.protocol).await;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(&codec::encode(&hello(key))).await.unwrap();
    let mut reader = vane_core::wire::FrameReader::new(codec::DEFAULT_MAX_FRAME_LEN);
    let frame = tokio::time::timeout(PATIENCE, reader.read(&mut tls))
        .await
        .expect("an answer in time")
        .unwrap()
        .expect("a frame");
    frame.kind.expect("a known kind")
}

/// Waits until the server has `n` handshakes in progress.
async fn handshakes_reach(server: &TestServer, n: u64) {
    tokio::time::timeout(PATIENCE, async {
        while server.metric("vane_handshakes_in_progress").await != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{n} handshakes in progress"));
}

async fn refused(server: &TestServer, reason: &str) -> u64 {
    server
        .metric(&format!("vane_refused_total{{reason=\"{reason}\"}}"))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_over_its_connection_rate_is_told_when_to_come_back() {
    let server = TestServer::start_with(|c| {
        c.limits.connects = Rate {
            per_second: 0.5,
            burst: 3.0,
        }
    })
    .await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    for _ in 0..3 {
        assert!(matches!(
            first_frame(&server, [127, 0, 0, 1], &key).await,
            Kind::Welcome(_)
        ));
    }
    let Kind::Error(e) = first_frame(&server, [127, 0, 0, 1], &key).await else {
        panic!("the fourth connection is refused");
    };
    assert_eq!(e.code(), ErrorCode::RateLimited);
    // A token every 2 s, and up to a second of spread.
    assert!(
        (2000..=3000).contains(&e.retry_after_ms),
        "retry after {} ms",
        e.retry_after_ms
    );
    // Another address is not affected.
    assert!(matches!(
        first_frame(&server, OTHER, &key).await,
        Kind::Welcome(_)
    ));
    assert_eq!(refused(&server, "connect_rate").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_waits_out_a_rate_limit_and_gets_in() {
    let server = TestServer::start_with(|c| {
        c.limits.connects = Rate {
            per_second: 2.0,
            burst: 1.0,
        }
    })
    .await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    assert!(matches!(
        first_frame(&server, [127, 0, 0, 1], &key).await,
        Kind::Welcome(_)
    ));
    // The bucket is empty: the client is refused, waits as told, and connects.
    let (client, _updates) = server.client(&key, TransportPreference::Tcp).await;
    let status = client.status();
    assert_eq!(status.transport, Some(Transport::Tcp));
    let why = status.last_error.unwrap_or_default();
    assert!(why.contains("RATE_LIMITED"), "{why}");
    // Over QUIC the same, after a Retry: the address is validated first, then limited.
    let (quic, _updates) = server.client(&key, TransportPreference::Quic).await;
    let status = quic.status();
    assert_eq!(status.transport, Some(Transport::Quic));
    let why = status.last_error.unwrap_or_default();
    assert!(why.contains("RATE_LIMITED"), "{why}");
    assert!(
        server.metric("vane_quic_retries_total").await >= 1,
        "the limited QUIC attempt got a Retry first"
    );
    client.close().await;
    quic.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_with_too_many_handshakes_open_is_closed_before_tls() {
    let server = TestServer::start_with(|c| c.limits.handshakes_per_source = 2).await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    // Two connections that never start TLS hold the source's two handshakes.
    let idle = [
        tcp_from([127, 0, 0, 1], server.protocol).await,
        tcp_from([127, 0, 0, 1], server.protocol).await,
    ];
    handshakes_reach(&server, 2).await;
    let mut third = tcp_from([127, 0, 0, 1], server.protocol).await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(PATIENCE, async {
        use tokio::io::AsyncReadExt;
        third.read(&mut buf).await
    })
    .await
    .expect("closed at once, not at the handshake timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(refused(&server, "handshakes").await, 1);
    // Another source is served; and once the two are gone, so is this one.
    assert!(matches!(
        first_frame(&server, OTHER, &key).await,
        Kind::Welcome(_)
    ));
    drop(idle);
    handshakes_reach(&server, 0).await;
    assert!(matches!(
        first_frame(&server, [127, 0, 0, 1], &key).await,
        Kind::Welcome(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_under_load_validates_addresses_with_a_retry() {
    // "Under load" from the first attempt on: every address not yet validated gets a Retry.
    let server = TestServer::start_with(|c| c.limits.quic_retry_above = 0).await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    let (client, _updates) = server.client(&key, TransportPreference::Quic).await;
    assert_eq!(client.status().transport, Some(Transport::Quic));
    assert!(server.metric("vane_quic_retries_total").await >= 1);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_guessing_admin_tokens_is_answered_429() {
    let server = TestServer::start_with(|c| {
        c.limits.admin_failures = Rate {
            per_second: 0.2,
            burst: 3.0,
        }
    })
    .await;
    let base = server.admin.base().to_owned();
    let wrong = server.admin.with_token("vane_adm_guess");
    for _ in 0..3 {
        let (status, _, _) = refusal(wrong.envs().await);
        assert_eq!(status, 401);
    }
    // The allowance is spent: 429, with Retry-After, even with the right token.
    let raw = reqwest::Client::new()
        .get(format!("{base}/api/v1/environments"))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 429);
    let retry: u64 = raw.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=7).contains(&retry), "Retry-After {retry}");
    let body: serde_json::Value = raw.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    let (_, code, _) = refusal(server.admin.envs().await);
    assert_eq!(code, ApiCode::RateLimited);
    // From another address the right token works.
    let other = reqwest::Client::builder()
        .local_address(IpAddr::from(OTHER))
        .build()
        .unwrap();
    let admin = AdminClient::with_http(other, &base, &server.token);
    assert!(admin.envs().await.is_ok());
    // /metrics takes no token, so it is not limited.
    assert!(refused(&server, "admin_failures").await >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_over_its_sdk_request_rate_is_answered_429() {
    let server = TestServer::start_with(|c| {
        c.limits.sdk_requests = Rate {
            per_second: 0.5,
            burst: 3.0,
        }
    })
    .await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    server.put_bool("prod", "banner", true).await;
    let url = format!("http://{}/ofrep/v1/evaluate/flags/banner", server.http);
    let body = serde_json::json!({"context": {"targetingKey": "u-1"}});
    let ask = |http: reqwest::Client| {
        let (url, key, body) = (url.clone(), key.clone(), body.clone());
        async move {
            http.post(url)
                .header("x-api-key", key)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let http = reqwest::Client::new();
    for _ in 0..3 {
        assert_eq!(ask(http.clone()).await.status(), 200);
    }
    let limited = ask(http.clone()).await;
    assert_eq!(limited.status(), 429);
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((2..=4).contains(&retry), "Retry-After {retry}");
    // The snapshot endpoint shares the allowance; another address has its own.
    let snapshot = http
        .get(format!("http://{}/sdk/v1/snapshot", server.http))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(snapshot.status(), 429);
    let other = reqwest::Client::builder()
        .local_address(IpAddr::from(OTHER))
        .build()
        .unwrap();
    assert_eq!(ask(other).await.status(), 200);
    assert_eq!(refused(&server, "sdk_requests").await, 2);
}
