//! The admin API: precise errors, and every write answered with the committed version.

use reqwest::Method;
use serde_json::json;

use crate::harness::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_refuses_bad_requests_precisely() {
    let server = TestServer::start().await;
    let (s, v) = server
        .admin_as("wrong", Method::GET, "/environments", None)
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );

    let (s, v) = server
        .admin_as(
            &server.token,
            Method::POST,
            "/environments",
            Some("{\"name\": ".into()),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("bad_json")),
        "{v}"
    );
    assert!(
        v["error"]["message"].as_str().unwrap().contains("line 1"),
        "{v}"
    );

    let (s, v) = server
        .admin(Method::GET, "/environments/nope/flags", None)
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("environment_not_found"))
    );

    server.env_with_key("prod", "server").await;
    let (s, v) = server
        .admin(Method::POST, "/environments", Some(json!({"name": "prod"})))
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("environment_exists"))
    );

    let (s, v) = server
        .admin(Method::GET, "/environments/prod/flags/nope", None)
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("flag_not_found"))
    );

    // Validation names the field.
    let bad = json!({"on": true, "variants": {"a": 1}, "off_variant": "b", "fallthrough": {"variant": "a"}});
    let (s, v) = server
        .admin(Method::PUT, "/environments/prod/flags/x", Some(bad))
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("off_variant"),
        "{v}"
    );

    let mismatched = json!({"key": "y", "on": true, "variants": {"a": 1}, "off_variant": "a", "fallthrough": {"variant": "a"}});
    let (s, _) = server
        .admin(Method::PUT, "/environments/prod/flags/x", Some(mismatched))
        .await;
    assert_eq!(s, 422);

    let (s, v) = server
        .admin(
            Method::POST,
            "/environments/prod/keys",
            Some(json!({"kind": "admin"})),
        )
        .await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_json")));

    // Nothing above changed the environment.
    let (_, env) = server.admin(Method::GET, "/environments/prod", None).await;
    assert_eq!(env["version"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_answer_with_consecutive_committed_versions() {
    let server = TestServer::start().await;
    server.env_with_key("prod", "server").await;
    assert_eq!(server.put_bool("prod", "a", true).await, 1);
    assert_eq!(server.toggle("prod", "a", false).await, 2);
    let (s, v) = server
        .admin(Method::DELETE, "/environments/prod/flags/a", None)
        .await;
    assert_eq!((s, v["version"].as_u64()), (200, Some(3)));
    let (s, _) = server
        .admin(Method::DELETE, "/environments/prod/flags/a", None)
        .await;
    assert_eq!(s, 404);
    let (_, flags) = server
        .admin(Method::GET, "/environments/prod/flags", None)
        .await;
    assert_eq!(flags["version"], 3);
    assert_eq!(flags["flags"].as_array().unwrap().len(), 0);
}
