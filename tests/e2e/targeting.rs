//! Targeting end to end: segments and rules through the admin API, rules-mode clients that
//! evaluate locally, and evaluated-mode (mobile) sessions that get only values, only when their
//! values change.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use vane_core::client::TransportPreference;
use vane_core::eval::{Context, Reason};
use vane_core::model::FlagValue;
use vane_core::sync::UpdateKind;
use vane_core::wire::FrameReader;
use vane_proto::codec;
use vane_proto::v1::{self as pb, frame::Kind};

use vane_server::api::ErrorCode;
use vane_server::keys::KeyKind;

use crate::harness::{
    PATIENCE, Proxy, TestServer, next_update, raw_tls, refusal, start_client, status_until,
    update_at,
};

async fn next_frame<S: tokio::io::AsyncRead + Unpin>(
    reader: &mut FrameReader,
    raw: &mut S,
) -> pb::Frame {
    tokio::time::timeout(PATIENCE, reader.read(raw))
        .await
        .expect("a frame in time")
        .unwrap()
        .expect("the stream is open")
}

fn ctx(json: Value) -> Context {
    Context::new(json).unwrap()
}

/// `checkout` serves "new" to staff (a segment) and to Germany, else "old".
async fn targeted_env(server: &TestServer, key_kind: KeyKind) -> String {
    let key = server.env_with_key("prod", key_kind).await;
    server
        .put_segment("prod", "staff", json!({"included": ["u-boss"], "rules": [{"clauses": [{"attribute": "email", "op": "ends_with", "values": ["@vane.dev"]}]}]}))
        .await;
    server
        .put_flag(
            "prod",
            "checkout",
            json!({
                "on": true,
                "variants": {"new": "new", "old": "old"},
                "off_variant": "old",
                "rules": [
                    {"id": "staff", "clauses": [{"op": "in_segment", "values": ["staff"]}], "serve": {"variant": "new"}},
                    {"id": "germany", "clauses": [{"attribute": "country", "op": "in", "values": ["de"]}], "serve": {"variant": "new"}}
                ],
                "fallthrough": {"variant": "old"}
            }),
        )
        .await;
    server.put_bool("prod", "unrelated", true).await;
    key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_mode_client_evaluates_rules_and_segments_locally() {
    let server = TestServer::start().await;
    let key = targeted_env(&server, KeyKind::Server).await;
    let (client, mut updates) = server.client(&key, TransportPreference::Quic).await;
    next_update(&mut updates).await;

    let staff = ctx(json!({"key": "u1", "email": "kim@vane.dev"}));
    let german = ctx(json!({"key": "u2", "country": "de"}));
    let other = ctx(json!({"key": "u3", "country": "fr"}));
    let d = client.details_for("checkout", &staff);
    assert_eq!(
        (d.value, d.reason),
        (
            Some(FlagValue::String("new".into())),
            Reason::TargetingMatch
        )
    );
    assert_eq!(
        client.details_for("checkout", &german).value,
        Some(FlagValue::String("new".into()))
    );
    let d = client.details_for("checkout", &other);
    assert_eq!(
        (d.value, d.reason),
        (Some(FlagValue::String("old".into())), Reason::Default)
    );

    // A segment change reaches the client, and the flags using it are reported as changed.
    let version = server
        .put_segment("prod", "staff", json!({"included": ["u3"]}))
        .await;
    let update = update_at(&mut updates, version).await;
    assert_eq!(update.kind, UpdateKind::Delta);
    assert_eq!(
        update.changed,
        vec!["checkout"],
        "the flag that uses the segment"
    );
    assert_eq!(
        client.details_for("checkout", &other).value,
        Some(FlagValue::String("new".into()))
    );
    assert_eq!(
        client.details_for("checkout", &staff).value,
        Some(FlagValue::String("old".into()))
    );

    // The client's own context, switched with identify.
    assert_eq!(client.string_value("checkout", "default"), "old");
    client.identify(german);
    assert_eq!(client.string_value("checkout", "default"), "new");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mobile_key_gets_values_for_its_context_and_never_rules() {
    let server = TestServer::start().await;
    let key = targeted_env(&server, KeyKind::Mobile).await;

    // On the wire: values only.
    let mut raw = raw_tls(&server).await;
    let hello: pb::Frame = pb::Hello {
        protocol_version: 1,
        sdk_key: key.clone(),
        mode: pb::DeliveryMode::Evaluated.into(),
        context: r#"{"key": "u2", "country": "de"}"#.into(),
        ..Default::default()
    }
    .into();
    raw.write_all(&codec::encode(&hello)).await.unwrap();
    raw.flush().await.unwrap();
    let mut reader = FrameReader::new(codec::DEFAULT_MAX_FRAME_LEN);
    assert_eq!(
        reader.read(&mut raw).await.unwrap().unwrap().kind_name(),
        "Welcome"
    );
    let Some(Kind::Snapshot(snapshot)) = reader.read(&mut raw).await.unwrap().unwrap().kind else {
        panic!("a snapshot")
    };
    assert!(
        snapshot.flags.is_empty() && snapshot.segments.is_empty(),
        "no rules leave the server"
    );
    let checkout = snapshot
        .values
        .iter()
        .find(|v| v.key == "checkout")
        .unwrap();
    assert_eq!(
        (checkout.variant.as_str(), checkout.reason()),
        ("new", pb::Reason::TargetingMatch)
    );

    // Through the client.
    let config = server
        .client_config(&key, TransportPreference::Tcp)
        .evaluated(ctx(json!({"key": "u2", "country": "de"})));
    let (client, _updates) = start_client(config).await;
    assert_eq!(client.string_value("checkout", "x"), "new");
    assert!(
        client.flags().get("checkout").is_none(),
        "the client holds a value, not the flag"
    );
    assert_eq!(client.details("checkout").reason, Reason::TargetingMatch);
    // A wrong-typed getter is the caller's default.
    assert!(client.bool_value("checkout", true));
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_sessions_whose_values_change_receive_a_delta() {
    let server = TestServer::start().await;
    let key = targeted_env(&server, KeyKind::Mobile).await;
    let session = |context: &'static str| {
        let server = &server;
        let key = key.clone();
        async move {
            let mut raw = raw_tls(server).await;
            let hello: pb::Frame = pb::Hello {
                protocol_version: 1,
                sdk_key: key,
                mode: pb::DeliveryMode::Evaluated.into(),
                context: context.into(),
                ..Default::default()
            }
            .into();
            raw.write_all(&codec::encode(&hello)).await.unwrap();
            raw.flush().await.unwrap();
            let mut reader = FrameReader::new(codec::DEFAULT_MAX_FRAME_LEN);
            reader.read(&mut raw).await.unwrap().unwrap(); // Welcome
            let Some(Kind::Snapshot(s)) = reader.read(&mut raw).await.unwrap().unwrap().kind else {
                panic!("a snapshot")
            };
            (raw, reader, s.selector.unwrap().version)
        }
    };
    let (mut de, mut de_reader, start) = session(r#"{"key": "u2", "country": "de"}"#).await;
    let (mut fr, mut fr_reader, _) = session(r#"{"key": "u3", "country": "fr"}"#).await;

    // Germany loses the rule: only the German session's value changes.
    let first = server
        .put_flag(
            "prod",
            "checkout",
            json!({"on": true, "variants": {"new": "new", "old": "old"}, "off_variant": "old",
                   "rules": [{"id": "staff", "clauses": [{"op": "in_segment", "values": ["staff"]}], "serve": {"variant": "new"}}],
                   "fallthrough": {"variant": "old"}}),
        )
        .await;
    let Some(Kind::Delta(d)) = next_frame(&mut de_reader, &mut de).await.kind else {
        panic!("a delta for de")
    };
    assert_eq!((d.from_version, d.to_version), (start, first));
    assert_eq!(d.values.len(), 1);
    assert_eq!(
        (d.values[0].key.as_str(), d.values[0].variant.as_str()),
        ("checkout", "old")
    );

    // Then a change that alters everyone's value. Frames are ordered, so if the French
    // session's next frame is this delta, starting from its old version, it received nothing
    // for the first change.
    let second = server.toggle("prod", "unrelated", false).await;
    let frame = next_frame(&mut fr_reader, &mut fr).await;
    let Some(Kind::Delta(d)) = frame.kind else {
        panic!("expected a delta, got {}", frame.kind_name())
    };
    assert_eq!(
        (d.from_version, d.to_version),
        (start, second),
        "nothing was sent for the first change"
    );
    assert_eq!(
        d.values.iter().map(|v| v.key.as_str()).collect::<Vec<_>>(),
        ["unrelated"]
    );
    drop(de);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identify_switches_context_on_a_live_session() {
    let server = TestServer::start().await;
    let key = targeted_env(&server, KeyKind::Mobile).await;
    let config = server
        .client_config(&key, TransportPreference::Quic)
        .evaluated(ctx(json!({"key": "u3", "country": "fr"})));
    let (client, mut updates) = start_client(config).await;
    assert_eq!(next_update(&mut updates).await.kind, UpdateKind::Snapshot);
    assert_eq!(client.string_value("checkout", "x"), "old");

    client.identify(ctx(json!({"key": "u-boss"})));
    let update = next_update(&mut updates).await;
    assert_eq!(update.kind, UpdateKind::Delta);
    assert_eq!(
        update.changed,
        vec!["checkout"],
        "only the value that differs"
    );
    assert_eq!(client.string_value("checkout", "x"), "new");

    // Awaited: when it returns true the getters already answer for the new context.
    let back = ctx(json!({"key": "u3", "country": "fr"}));
    assert!(client.identify_and_wait(back, PATIENCE).await.unwrap());
    assert_eq!(client.string_value("checkout", "x"), "old");
    // Offline it answers false in time, and the previous context's values stay.
    client.set_network_available(false);
    let mut status = client.watch_status();
    status_until(&mut status, |s| {
        s.state != vane_core::client::ConnectionState::Connected
    })
    .await;
    let boss = ctx(json!({"key": "u-boss"}));
    let boss_json = boss.to_json().to_string();
    let waited = client.identify_and_wait(boss, Duration::from_millis(300));
    assert!(!waited.await.unwrap());
    assert_eq!(client.string_value("checkout", "x"), "old");
    // Back online, the Hello carries the new context.
    client.set_network_available(true);
    status_until(&mut status, |s| {
        s.values_for.as_deref() == Some(&*boss_json)
    })
    .await;
    assert_eq!(client.string_value("checkout", "x"), "new");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evaluated_session_resumes_with_the_values_that_changed() {
    let server = TestServer::start().await;
    let key = targeted_env(&server, KeyKind::Mobile).await;
    let proxy = Proxy::start(server.protocol).await;
    let mut config = server
        .client_config(&key, TransportPreference::Tcp)
        .evaluated(ctx(json!({"key": "u3", "country": "fr"})));
    config.endpoint = proxy.addr.to_string();
    let (client, mut updates) = start_client(config).await;
    next_update(&mut updates).await;

    let mut status = client.watch_status();
    proxy.cut();
    status_until(&mut status, |s| {
        s.state != vane_core::client::ConnectionState::Connected
    })
    .await;
    let version = server
        .put_segment("prod", "staff", json!({"included": ["u3"]}))
        .await;
    proxy.restore();
    let update = update_at(&mut updates, version).await;
    assert_eq!(update.kind, UpdateKind::Delta, "resumed, not re-downloaded");
    assert_eq!(update.changed, vec!["checkout"]);
    assert_eq!(client.string_value("checkout", "x"), "new");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_context_is_refused_for_good() {
    let server = TestServer::start().await;
    let key = targeted_env(&server, KeyKind::Mobile).await;
    // A context whose targeting key is not a string: the client API cannot even build one, so
    // it is sent by hand.
    let mut raw = raw_tls(&server).await;
    let hello: pb::Frame = pb::Hello {
        protocol_version: 1,
        sdk_key: key,
        mode: pb::DeliveryMode::Evaluated.into(),
        context: r#"{"key": 42}"#.into(),
        ..Default::default()
    }
    .into();
    raw.write_all(&codec::encode(&hello)).await.unwrap();
    raw.flush().await.unwrap();
    let frames = crate::harness::read_to_end(&mut raw).await;
    let Some(Kind::Error(e)) = &frames[0].kind else {
        panic!("an error")
    };
    assert_eq!(e.code(), pb::ErrorCode::InvalidContext);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_broken_targeting_and_explains_decisions() {
    let server = TestServer::start().await;
    targeted_env(&server, KeyKind::Server).await;
    let flag_using = |segment: &str| {
        json!({"on": true, "variants": {"a": 1, "b": 2}, "off_variant": "a",
               "rules": [{"clauses": [{"op": "in_segment", "values": [segment]}], "serve": {"variant": "b"}}],
               "fallthrough": {"variant": "a"}})
    };
    let (s, _, message) = refusal(
        server
            .admin
            .put_flag("prod", "f", &flag_using("nope"))
            .await,
    );
    assert_eq!(s, 422, "{message}");
    assert!(message.contains("unknown segment \"nope\""), "{message}");

    // a → b, then b → a would close a cycle.
    server
        .put_segment("prod", "b", json!({"included": ["x"]}))
        .await;
    server
        .put_segment(
            "prod",
            "a",
            json!({"rules": [{"clauses": [{"op": "in_segment", "values": ["b"]}]}]}),
        )
        .await;
    let cycle = json!({"rules": [{"clauses": [{"op": "in_segment", "values": ["a"]}]}]});
    let (s, _, message) = refusal(server.admin.put_segment("prod", "b", &cycle).await);
    assert_eq!(s, 422, "{message}");
    assert!(message.contains("cycle"), "{message}");

    // A segment in use cannot be deleted; the answer names who uses it.
    let (s, code, message) = refusal(server.admin.delete_segment("prod", "staff").await);
    assert_eq!((s, code), (409, ErrorCode::SegmentInUse), "{message}");
    assert!(message.contains("flag \"checkout\""), "{message}");

    let bad_regex = json!({"on": true, "variants": {"a": 1}, "off_variant": "a",
        "rules": [{"clauses": [{"attribute": "x", "op": "matches", "values": ["("]}], "serve": {"variant": "a"}}],
        "fallthrough": {"variant": "a"}});
    let (s, _, message) = refusal(server.admin.put_flag("prod", "g", &bad_regex).await);
    assert_eq!(s, 422);
    assert!(
        message.starts_with("rules[0].clauses[0].values[0]"),
        "{message}"
    );

    // Why does this user get "new"?
    let why = server
        .admin
        .evaluate("prod", "checkout", json!({"key": "u9", "country": "de"}))
        .await
        .unwrap();
    assert_eq!(why.served.value, Some(FlagValue::String("new".into())));
    assert_eq!(why.served.reason, Reason::TargetingMatch);
    let rule = why.rule.expect("a rule decided");
    assert_eq!((rule.index, rule.id.as_deref()), (1, Some("germany")));
    let (s, code, _) = refusal(server.admin.evaluate("prod", "checkout", json!([1])).await);
    assert_eq!((s, code), (422, ErrorCode::InvalidContext));
}
