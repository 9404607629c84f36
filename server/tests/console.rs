//! The web console in a real browser: Debian's headless Chromium driven by playwright-core
//! (`tests/console/check.mjs`) against `vane serve`, with a `vane watch` connected to the
//! environment it toggles. The script signs in, creates a flag, sees an invalid rule's error at
//! its field, sees the live view count the watcher's ack, revokes a key, follows a clone to
//! ready, and checks the phone width; it writes a screenshot of every page to
//! `docs/screenshots/` (linked from the README). `scripts/test-all` installs Chromium and the
//! npm package.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::{Running, admin, serve_loopback, vane};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("tests/console/check.mjs");
    assert!(
        root.join("tests/console/node_modules/playwright-core")
            .exists()
            && Path::new("/usr/bin/chromium").exists(),
        "needs Chromium and tests/console's npm packages (scripts/test-all installs them)"
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    // Clones copy slowly here, so the browser sees one in progress.
    let served = serve_loopback(data, &["--clone-batch", "5", "--clone-pause-ms", "100"]);
    let admin = admin(data, &served);
    let key = common::env_with_key(&admin, "prod").await;
    for i in 0..40 {
        let flag = vane_core::model::Flag::boolean(format!("f{i:02}"), true, true);
        admin.put_flag("prod", &flag.key, &flag).await.unwrap();
    }
    let mut watch = vane(data);
    watch.args([
        "watch",
        "--endpoint",
        &served.protocol,
        "--sdk-key",
        &key,
        "--ca",
        &data.join("tls/ca.pem").display().to_string(),
    ]);
    let _watch = Running::spawn(watch);
    let token = std::fs::read_to_string(data.join("admin-token")).unwrap();
    let shots = root.join("docs/screenshots");
    std::fs::create_dir_all(&shots).unwrap();

    let mut node = Command::new("node")
        .arg(&script)
        .arg(&served.http)
        .arg(token.trim())
        .arg(&shots)
        .stdout(Stdio::piped())
        .spawn()
        .expect("node (Node.js 20) is installed");
    let out = BufReader::new(node.stdout.take().unwrap());
    let mut steps = Vec::new();
    for line in out.lines().map_while(Result::ok) {
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_ne!(
            v["step"],
            "failed",
            "{}",
            serde_json::to_string_pretty(&v).unwrap()
        );
        steps.push(v);
    }
    let status = node.wait().unwrap();
    assert!(status.success(), "{steps:?}");
    let names: Vec<&str> = steps.iter().filter_map(|s| s["step"].as_str()).collect();
    assert_eq!(
        names,
        [
            "signed in",
            "flag created",
            "invalid rule shown at its field",
            "live view counted the ack",
            "revoked key disappeared",
            "evaluate and audit shown",
            "segments and tokens",
            "clone showed progress, then ready",
            "phone width",
            "done"
        ]
    );
    // What the browser did, the server has: the flag, the clone, the revoked key.
    assert_eq!(admin.flag("prod", "checkout").await.unwrap().rules.len(), 1);
    assert_eq!(admin.flags("staging").await.unwrap().flags.len(), 41);
    let keys = admin.keys("prod").await.unwrap().keys;
    assert!(keys.iter().any(|k| k.revoked_at.is_some()));
    for page in [
        "sign-in",
        "environments",
        "flags",
        "invalid-rule",
        "live",
        "keys",
        "evaluate",
        "audit",
        "clone-progress",
        "clone-ready",
        "phone",
    ] {
        assert!(
            shots.join(format!("{page}.png")).exists(),
            "screenshot {page}"
        );
    }
}
