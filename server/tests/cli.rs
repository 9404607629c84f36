//! The `vane` binary as people and scripts use it: `serve`, the admin commands, and
//! `watch --json`, as separate processes on loopback. This is the README's quick start.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

mod common;

use common::{Running, serve as serve_process, vane};

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run vane")
}

/// Runs an admin command against the server at `http`.
fn admin(data: &Path, http: &str, args: &[&str]) -> Output {
    let mut cmd = vane(data);
    cmd.args(args).args(["--server", http]);
    run(&mut cmd)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Starts `vane serve` on ephemeral ports; returns it with its protocol and HTTP addresses.
fn serve(data: &Path) -> (Running, String, String) {
    let served = serve_process(data);
    (served.process, served.protocol, served.http)
}

#[test]
fn quick_start_serve_watch_toggle() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (mut server, protocol, http) = serve(data);
    assert!(server.line().starts_with("clients trust "));
    assert!(
        server.line().starts_with("admin token"),
        "the token is shown on first start"
    );
    let token_file = std::fs::read_to_string(data.join("admin-token")).unwrap();
    assert_eq!(server.line().trim(), token_file.trim());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("admin-token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let admin = |args: &[&str]| admin(data, &http, args);
    let out = admin(&["env", "create", "prod"]);
    assert!(out.status.success(), "{out:?}");
    let out = admin(&["key", "create", "prod", "--kind", "server"]);
    assert!(out.status.success(), "{out:?}");
    let key = stdout(&out);
    assert!(
        key.starts_with("vane_srv_") && key.len() == 41 && !key.contains(char::is_whitespace),
        "{key}"
    );
    let out = admin(&["flag", "set", "prod", "new-checkout", "--bool", "true"]);
    assert_eq!(stdout(&out), "version 1");

    let mut cmd = vane(data);
    cmd.args([
        "watch",
        "--endpoint",
        &protocol,
        "--sdk-key",
        &key,
        "--json",
    ]);
    let watch = Running::spawn(cmd);
    let first: Value = serde_json::from_str(&watch.line()).unwrap();
    assert_eq!(first["kind"], "snapshot");
    assert_eq!(first["version"], 1);
    assert_eq!(first["transport"], "quic");
    assert_eq!(first["changed"], serde_json::json!(["new-checkout"]));
    assert_eq!(first["epoch"].as_str().unwrap().len(), 16);

    let out = admin(&["flag", "toggle", "prod", "new-checkout", "--off"]);
    assert_eq!(stdout(&out), "version 2");
    let update: Value = serde_json::from_str(&watch.line()).unwrap();
    assert_eq!(update["kind"], "delta");
    assert_eq!(update["version"], 2);
    assert_eq!(update["values"]["new-checkout"], false);
    assert_eq!(update["epoch"], first["epoch"]);

    // A flag from a file, and the list as JSON.
    let file = data.join("banner.json");
    std::fs::write(
        &file,
        r#"{"on": true, "variants": {"a": "hello", "b": "bye"}, "off_variant": "b", "fallthrough": {"variant": "a"}}"#,
    )
    .unwrap();
    let out = admin(&[
        "flag",
        "set",
        "prod",
        "banner",
        "--file",
        file.to_str().unwrap(),
    ]);
    assert_eq!(stdout(&out), "version 3", "{out:?}");
    let update: Value = serde_json::from_str(&watch.line()).unwrap();
    assert_eq!(update["values"]["banner"], "hello");
    let out = admin(&["flag", "list", "prod", "--json"]);
    let list: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(list["flags"].as_array().unwrap().len(), 2);

    assert!(server.terminate().success(), "SIGTERM is a clean exit");
    drop(watch);

    // A restart keeps the token (and does not show it again).
    let (mut server, _, _) = serve(data);
    assert!(server.line().starts_with("clients trust "));
    assert!(server.terminate().success());
}

#[test]
fn exit_codes_are_dependable() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (_server, _, http) = serve(data);
    let admin = |args: &[&str]| admin(data, &http, args);
    assert!(admin(&["env", "create", "prod"]).status.success());

    let out = admin(&["flag", "toggle", "prod", "nope", "--off"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("flag_not_found"),
        "{out:?}"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout when a command fails"
    );

    let out = admin(&["env", "list", "--token", "wrong"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unauthorized"));

    let out = admin(&["flag", "set", "prod", "x"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a missing --bool/--file is a usage error"
    );

    let mut cmd = vane(data);
    let out = run(cmd.args(["env", "list", "--server", "http://127.0.0.1:9"]));
    assert_eq!(out.status.code(), Some(3), "unreachable server");

    let out = run(vane(&data.join("elsewhere")).args(["env", "list", "--server", &http]));
    assert_eq!(out.status.code(), Some(3), "no admin token found");

    let mut cmd = vane(data);
    let out = run(cmd.args([
        "watch",
        "--endpoint",
        "127.0.0.1:1",
        "--sdk-key",
        "k",
        "--ca",
        "/nonexistent.pem",
    ]));
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn watch_exits_on_a_wrong_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (_server, protocol, _) = serve(data);
    let mut cmd = vane(data);
    let out = run(cmd.args([
        "watch",
        "--endpoint",
        &protocol,
        "--sdk-key",
        "vane_srv_wrong",
        "--json",
    ]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("authentication failed"),
        "{out:?}"
    );
}

#[test]
fn segments_eval_and_evaluated_watch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (_server, protocol, http) = serve(data);
    let admin = |args: &[&str]| admin(data, &http, args);
    assert!(admin(&["env", "create", "prod"]).status.success());
    let segment = data.join("staff.json");
    std::fs::write(&segment, r#"{"included": ["u-boss"]}"#).unwrap();
    let out = admin(&[
        "segment",
        "set",
        "prod",
        "staff",
        "--file",
        segment.to_str().unwrap(),
    ]);
    assert_eq!(stdout(&out), "version 1", "{out:?}");
    let flag = data.join("checkout.json");
    std::fs::write(
        &flag,
        r#"{"on": true, "variants": {"new": "new-flow", "old": "legacy"}, "off_variant": "old",
            "rules": [{"id": "staff", "clauses": [{"op": "in_segment", "values": ["staff"]}], "serve": {"variant": "new"}},
                      {"id": "germany", "clauses": [{"attribute": "country", "op": "in", "values": ["de"]}],
                       "serve": {"rollout": {"variants": [{"variant": "new", "weight": 30000}, {"variant": "old", "weight": 70000}]}}}],
            "fallthrough": {"variant": "old"}}"#,
    )
    .unwrap();
    assert_eq!(
        stdout(&admin(&[
            "flag",
            "set",
            "prod",
            "checkout",
            "--file",
            flag.to_str().unwrap()
        ])),
        "version 2"
    );

    // The README's example: user-1 in Germany lands in bucket 21999 of the germany rule.
    let out = admin(&[
        "eval",
        "prod",
        "checkout",
        "--context",
        r#"{"key": "user-1", "country": "de"}"#,
    ]);
    let text = stdout(&out);
    assert!(text.contains("value:   \"new-flow\""), "{text}");
    assert!(text.contains("reason:  SPLIT"), "{text}");
    assert!(text.contains("rule:    1 (germany)"), "{text}");
    assert!(text.contains("bucket:  21999 of 100000"), "{text}");
    let out = admin(&["eval", "prod", "checkout", "--context", "not json"]);
    assert_eq!(out.status.code(), Some(2));

    // Deleting a segment in use is refused, naming the flag.
    let out = admin(&["segment", "delete", "prod", "staff"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("flag \"checkout\""),
        "{out:?}"
    );

    // A phone's view: evaluated mode with a mobile key.
    let key = stdout(&admin(&["key", "create", "prod", "--kind", "mobile"]));
    let mut cmd = vane(data);
    cmd.args([
        "watch",
        "--endpoint",
        &protocol,
        "--sdk-key",
        &key,
        "--json",
        "--context",
        r#"{"key": "u-boss"}"#,
    ]);
    let watch = Running::spawn(cmd);
    let first: Value = serde_json::from_str(&watch.line()).unwrap();
    assert_eq!(first["kind"], "snapshot");
    assert_eq!(first["values"]["checkout"], "new-flow");
    std::fs::write(&segment, r#"{"included": []}"#).unwrap();
    assert_eq!(
        stdout(&admin(&[
            "segment",
            "set",
            "prod",
            "staff",
            "--file",
            segment.to_str().unwrap()
        ])),
        "version 3"
    );
    let update: Value = serde_json::from_str(&watch.line()).unwrap();
    assert_eq!(update["kind"], "delta");
    assert_eq!(update["changed"], serde_json::json!(["checkout"]));
    assert_eq!(update["values"]["checkout"], "legacy");
}

#[test]
fn clone_with_progress_named_tokens_and_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (_server, _, http) = serve(data);
    let admin = |args: &[&str]| admin(data, &http, args);
    assert!(admin(&["env", "create", "prod"]).status.success());
    let out = admin(&["token", "create", "alice"]);
    assert!(out.status.success(), "{out:?}");
    let alice = stdout(&out);
    assert!(alice.starts_with("vane_adm_"), "the secret alone: {alice}");
    for i in 0..5 {
        let key = format!("f{i}");
        let out = admin(&[
            "flag", "set", "prod", &key, "--bool", "true", "--token", &alice,
        ]);
        assert!(out.status.success(), "{out:?}");
    }

    let out = admin(&["env", "clone", "prod", "staging", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout(&out).contains("staging is ready (5 items copied from prod)"),
        "{out:?}"
    );
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        progress.contains("] 5/5"),
        "a progress bar on stderr: {progress}"
    );
    let out = admin(&["env", "get", "staging", "--json"]);
    let env: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(env["state"], "ready");
    assert_eq!(env["flags"], 5);

    let out = admin(&["audit", "prod", "--limit", "2"]);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(
        text.contains("alice") && text.contains("flag.put"),
        "{text}"
    );
    assert!(
        text.contains("more: vane audit prod --before"),
        "a next page: {text}"
    );
    let out = admin(&["audit", "prod", "--json"]);
    let page: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        page["entries"].as_array().unwrap().len(),
        6,
        "five puts and the creation"
    );

    assert!(admin(&["token", "revoke", "alice"]).status.success());
    let out = admin(&["env", "list", "--token", &alice]);
    assert_eq!(out.status.code(), Some(1), "a revoked token is refused");
    let out = admin(&["token", "list"]);
    assert!(stdout(&out).contains("revoked"), "{out:?}");
    let out = admin(&["job", "get", "job_0000000000000000"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("job_not_found"),
        "{out:?}"
    );
}

#[test]
fn relay_from_the_command_line() {
    let (origin_dir, relay_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (origin, relay_data) = (origin_dir.path(), relay_dir.path());
    let (mut server, protocol, http) = serve(origin);
    let admin = |args: &[&str]| admin(origin, &http, args);
    assert!(admin(&["env", "create", "prod"]).status.success());
    let key = stdout(&admin(&["key", "create", "prod", "--kind", "server"]));
    let out = admin(&["flag", "set", "prod", "new-checkout", "--bool", "true"]);
    assert_eq!(stdout(&out), "version 1");

    // A mobile key cannot relay: said before anything starts.
    let mobile = stdout(&admin(&["key", "create", "prod", "--kind", "mobile"]));
    let out = run(vane(relay_data).args(["relay", "--upstream", &protocol, "--sdk-key", &mobile]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only server keys"), "{err}");

    // The key from the environment, as an operator would give it.
    let ca = origin.join("tls").join("ca.pem");
    let mut cmd = vane(relay_data);
    cmd.env("VANE_SDK_KEYS", &key).args([
        "relay",
        "--upstream",
        &protocol,
        "--upstream-ca",
        ca.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
    ]);
    let mut relay = Running::spawn(cmd);
    // "vane X relay: protocol 127.0.0.1:P (QUIC and TCP+TLS), HTTP http://127.0.0.1:Q"
    let banner = relay.line();
    let field = |after: &str| {
        banner
            .split(after)
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .unwrap_or_else(|| panic!("{after} in {banner:?}"))
            .to_owned()
    };
    let (relay_protocol, relay_http) = (field("protocol "), field("HTTP "));
    assert!(relay.line().starts_with("clients trust "));
    common::wait_ready(&relay_http);

    // `vane watch` on the relay (trusting the relay's own CA, in its data directory).
    let mut cmd = vane(relay_data);
    cmd.args([
        "watch",
        "--endpoint",
        &relay_protocol,
        "--sdk-key",
        &key,
        "--json",
    ]);
    let watch = Running::spawn(cmd);
    let first: Value = serde_json::from_str(&watch.line()).unwrap();
    assert_eq!(
        (first["kind"].as_str(), first["version"].as_u64()),
        (Some("snapshot"), Some(1))
    );
    let out = admin(&["flag", "toggle", "prod", "new-checkout", "--off"]);
    assert_eq!(stdout(&out), "version 2");
    let update: Value = serde_json::from_str(&watch.line()).unwrap();
    assert_eq!(
        (update["kind"].as_str(), update["version"].as_u64()),
        (Some("delta"), Some(2))
    );
    assert_eq!(update["values"]["new-checkout"], false);
    assert_eq!(update["epoch"], first["epoch"]);

    assert!(relay.terminate().success(), "SIGTERM is a clean exit");
    assert!(server.terminate().success());
}
