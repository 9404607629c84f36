//! The OpenFeature provider over the Vane client against a real server: OpenFeature's own API
//! (the `open-feature` crate) resolves every type with Vane's variant and reason, maps Vane's
//! errors to OpenFeature's codes, and sees a change pushed to the client.

use open_feature::{EvaluationContext, EvaluationErrorCode, EvaluationReason, OpenFeature};
use serde_json::json;
use vane_core::client::TransportPreference;
use vane_openfeature::VaneProvider;
use vane_server::keys::KeyKind;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openfeatures_api_resolves_through_the_vane_client_and_sees_changes() {
    let server = TestServer::start().await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    server.put_bool("prod", "banner", true).await;
    server
        .put_flag(
            "prod",
            "limit",
            json!({"on": true, "variants": {"low": 10, "high": 2.5}, "off_variant": "low",
                   "rules": [{"id": "pros", "clauses": [{"attribute": "plan", "op": "in", "values": ["pro"]}],
                              "serve": {"variant": "high"}}],
                   "fallthrough": {"variant": "low"}}),
        )
        .await;
    server
        .put_flag(
            "prod",
            "theme",
            json!({"on": true, "variants": {"dark": {"bg": "#000", "depth": 2}, "light": {"bg": "#fff", "depth": 1}},
                   "off_variant": "light", "fallthrough": {"variant": "dark"}}),
        )
        .await;
    server.put_flag("prod", "split", fifty_fifty()).await;
    let (client, _updates) = server.client(&key, TransportPreference::Tcp).await;
    let provider = VaneProvider::new(client);
    let mut changes = provider.changes();
    let mut api = OpenFeature::singleton_mut().await;
    api.set_provider(provider).await;
    let flags = api.create_client();
    drop(api);

    let user = EvaluationContext::default().with_targeting_key("u-1");
    let pro = user.clone().with_custom_field("plan", "pro");
    let banner = flags
        .get_bool_details("banner", Some(&user), None)
        .await
        .unwrap();
    assert!(banner.value);
    assert_eq!(banner.reason, Some(EvaluationReason::Static));
    assert_eq!(
        flags
            .get_int_value("limit", Some(&user), None)
            .await
            .unwrap(),
        10
    );
    let high = flags
        .get_float_details("limit", Some(&pro), None)
        .await
        .unwrap();
    assert_eq!(
        (high.value, high.reason),
        (2.5, Some(EvaluationReason::TargetingMatch))
    );
    assert_eq!(high.variant.as_deref(), Some("high"));
    let theme = flags
        .get_struct_details::<open_feature::StructValue>("theme", Some(&user), None)
        .await
        .unwrap();
    assert_eq!(
        theme.value.fields["bg"],
        open_feature::Value::String("#000".into())
    );
    let split = flags
        .get_string_details("split", Some(&user), None)
        .await
        .unwrap();
    assert_eq!(split.reason, Some(EvaluationReason::Split));

    // Errors: OpenFeature's codes, and the caller's default from the *_value getters.
    let missing = flags
        .get_bool_details("nope", Some(&user), None)
        .await
        .unwrap_err();
    assert_eq!(missing.code, EvaluationErrorCode::FlagNotFound);
    let keyless = flags
        .get_string_details("split", Some(&EvaluationContext::default()), None)
        .await
        .unwrap_err();
    assert_eq!(keyless.code, EvaluationErrorCode::TargetingKeyMissing);
    let mismatch = flags
        .get_string_details("banner", Some(&user), None)
        .await
        .unwrap_err();
    assert_eq!(mismatch.code, EvaluationErrorCode::TypeMismatch);

    // A change pushed to the client: the update names the flag, and OpenFeature sees the value.
    server.toggle("prod", "banner", false).await;
    let update = tokio::time::timeout(PATIENCE, async {
        loop {
            let u = changes.recv().await.unwrap();
            if u.changed.contains(&"banner".to_owned()) {
                return u;
            }
        }
    })
    .await
    .expect("the change in time");
    assert_eq!(update.changed, ["banner"]);
    let off = flags
        .get_bool_details("banner", Some(&user), None)
        .await
        .unwrap();
    assert!(!off.value);
    assert_eq!(off.reason, Some(EvaluationReason::Disabled));
}
