//! Hostile input on the HTTP port: every error is the API's JSON error with a precise status,
//! slow clients are cut off, and the server keeps serving everyone else.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vane_server::api::{ErrorCode, routes};
use vane_server::keys::KeyKind;

use crate::harness::{PATIENCE, TestServer, refusal};

/// Sends `request` as written on a fresh connection; returns the status line's code and the
/// body, once the server answers (or closes).
async fn raw_http(server: &TestServer, request: &[u8]) -> (u16, Value) {
    let mut tcp = TcpStream::connect(server.http).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut answer))
        .await
        .expect("the server answers or closes in time")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b.trim()).ok())
        .unwrap_or(Value::Null);
    (status, body)
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_a_json_error_with_its_status() {
    let server = TestServer::start().await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    let admin = &server.admin;

    // A method the endpoint does not take: 405, JSON, and `Allow` kept.
    let answer = admin.raw(Method::PATCH, routes::ENVS, None).await.unwrap();
    assert_eq!(
        (answer.status, code(&answer.body)),
        (405, "method_not_allowed")
    );

    // A body over the 2 MB limit.
    let huge = format!("{{\"name\": \"{}\"}}", "x".repeat(3 * 1024 * 1024));
    let answer = admin
        .raw(Method::POST, routes::ENVS, Some(huge))
        .await
        .unwrap();
    assert_eq!(
        (answer.status, code(&answer.body)),
        (413, "payload_too_large")
    );

    // JSON nested deeper than the parser goes.
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let path = vane_server::api::route(routes::FLAG, &["prod", "deep"]);
    let answer = admin.raw(Method::PUT, &path, Some(deep)).await.unwrap();
    assert_eq!((answer.status, code(&answer.body)), (400, "bad_json"));

    // A context that is not JSON, on the SDK endpoint.
    let answer = reqwest::Client::new()
        .get(format!(
            "http://{}{}?context=%7Bnot",
            server.http,
            routes::SDK_SNAPSHOT
        ))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 400);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(code(&body), "invalid_context");

    // A flag key that reads as a path: clients collapse it, so the server refuses it.
    let flag = r#"{"on": true, "variants": {"a": 1}, "off_variant": "a", "fallthrough": {"variant": "a"}}"#;
    let request = format!(
        "PUT /api/v1/environments/prod/flags/.. HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{flag}",
        server.token,
        flag.len()
    );
    let (status, body) = raw_http(&server, request.as_bytes()).await;
    assert_eq!((status, code(&body)), (422, "invalid"), "{body}");
    let (s, c, _) = refusal(admin.create_env("..").await);
    assert_eq!((s, c), (422, ErrorCode::Invalid));

    // Nothing above changed anything, and the server still serves.
    assert_eq!(admin.envs().await.unwrap().environments.len(), 1);
    assert!(admin.flags("prod").await.unwrap().flags.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_others_are_served() {
    let server = TestServer::start_with(|c| {
        c.http_limits.header_read_timeout = Duration::from_millis(300);
        c.http_limits.body_timeout = Duration::from_millis(300);
    })
    .await;

    // Headers that never finish: the connection is closed.
    let mut slow = TcpStream::connect(server.http).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // A body that never finishes: 408, as JSON.
    let request = format!(
        "POST /api/v1/environments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"name\"",
        server.token
    );
    let body_slow = raw_http(&server, request.as_bytes());

    // Meanwhile everyone else is served.
    assert!(server.admin.ready().await.unwrap());
    server.admin.create_env("prod").await.unwrap();

    let (status, body) = body_slow.await;
    assert_eq!((status, code(&body)), (408, "timeout"), "{body}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the half-sent request was closed");
    assert!(server.admin.env("prod").await.is_ok());
    assert_eq!(
        json!(server.admin.envs().await.unwrap().environments.len()),
        json!(1),
        "the slow POST created nothing"
    );
}
