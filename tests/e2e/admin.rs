//! The admin API: precise errors, and every write answered with the committed version.

use reqwest::Method;
use serde_json::json;
use vane_server::api::{ErrorCode, routes};
use vane_server::keys::KeyKind;

use crate::harness::{TestServer, refusal};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_refuses_bad_requests_precisely() {
    let server = TestServer::start().await;
    let admin = &server.admin;
    let (s, code, _) = refusal(admin.with_token("wrong").envs().await);
    assert_eq!((s, code), (401, ErrorCode::Unauthorized));

    let answer = admin
        .raw(Method::POST, routes::ENVS, Some("{\"name\": ".into()))
        .await
        .unwrap();
    assert_eq!(answer.status, 400);
    assert_eq!(answer.body["error"]["code"], "bad_json");
    let message = answer.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("line 1"), "{message}");

    let (s, code, _) = refusal(admin.flags("nope").await);
    assert_eq!((s, code), (404, ErrorCode::EnvironmentNotFound));

    server.env_with_key("prod", KeyKind::Server).await;
    let (s, code, _) = refusal(admin.create_env("prod").await);
    assert_eq!((s, code), (409, ErrorCode::EnvironmentExists));

    let (s, code, _) = refusal(admin.flag("prod", "nope").await);
    assert_eq!((s, code), (404, ErrorCode::FlagNotFound));

    // Validation names the field.
    let bad = json!({"on": true, "variants": {"a": 1}, "off_variant": "b", "fallthrough": {"variant": "a"}});
    let (s, code, message) = refusal(admin.put_flag("prod", "x", &bad).await);
    assert_eq!((s, code), (422, ErrorCode::Invalid));
    assert!(message.starts_with("off_variant"), "{message}");

    let mismatched = json!({"key": "y", "on": true, "variants": {"a": 1}, "off_variant": "a", "fallthrough": {"variant": "a"}});
    let (s, _, _) = refusal(admin.put_flag("prod", "x", &mismatched).await);
    assert_eq!(s, 422);

    let answer = admin
        .raw(
            Method::POST,
            &vane_server::api::route(routes::KEYS, &["prod"]),
            Some(json!({"kind": "admin"}).to_string()),
        )
        .await
        .unwrap();
    assert_eq!(
        (answer.status, &answer.body["error"]["code"]),
        (400, &json!("bad_json"))
    );

    let answer = admin
        .raw(Method::GET, "/no-such-endpoint", None)
        .await
        .unwrap();
    assert_eq!(
        (answer.status, &answer.body["error"]["code"]),
        (404, &json!("not_found"))
    );

    // Nothing above changed the environment.
    assert_eq!(admin.env("prod").await.unwrap().at.version, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_answer_with_consecutive_committed_versions() {
    let server = TestServer::start().await;
    server.env_with_key("prod", KeyKind::Server).await;
    assert_eq!(server.put_bool("prod", "a", true).await, 1);
    assert_eq!(server.toggle("prod", "a", false).await, 2);
    let written = server.admin.delete_flag("prod", "a").await.unwrap();
    assert_eq!(written.at.version, 3);
    let (s, code, _) = refusal(server.admin.delete_flag("prod", "a").await);
    assert_eq!((s, code), (404, ErrorCode::FlagNotFound));
    let flags = server.admin.flags("prod").await.unwrap();
    assert_eq!(flags.at.version, 3);
    assert!(flags.flags.is_empty());
}
