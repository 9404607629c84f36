//! Clients that do not read: the server never queues per session. A slow reader is brought
//! current with one merged delta; a reader that stops for longer than the write timeout is
//! dropped, and everyone else keeps receiving.

use std::time::Duration;

use bytes::BytesMut;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vane_core::client::TransportPreference;
use vane_proto::codec;
use vane_proto::v1::frame::Kind;

use vane_server::keys::KeyKind;

use crate::harness::{PATIENCE, TestServer, hello, next_update, raw_tls, status_until};

/// A flag whose every delta is about 30 KB, so a few hundred changes overflow any socket buffer
/// (loopback send buffers are capped at 4 MiB here).
async fn put_big(server: &TestServer, i: usize) -> u64 {
    let text = format!("{i:0>30000}");
    let flag = json!({
        "on": true,
        "variants": {"big": text, "small": ""},
        "off_variant": "small",
        "fallthrough": {"variant": "big"},
    });
    server.put_flag("prod", "big", flag).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_gets_one_merged_delta_instead_of_a_queue() {
    let server =
        TestServer::start_with(|c| c.session.write_timeout = Duration::from_secs(60)).await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    let mut raw = raw_tls(&server).await;
    raw.write_all(&codec::encode(&hello(&key))).await.unwrap();
    raw.flush().await.unwrap();

    // Read Welcome and the first catch-up, then stop reading while 300 changes are committed.
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    while frames.len() < 2 {
        raw.read_buf(&mut buf).await.unwrap();
        while let Some(f) = codec::decode(&mut buf, codec::DEFAULT_MAX_FRAME_LEN).unwrap() {
            frames.push(f);
        }
    }
    const CHANGES: usize = 300;
    let mut last = 0;
    for i in 0..CHANGES {
        last = put_big(&server, i).await;
    }

    // Now read everything: the deltas must chain from version 0 to the last one.
    let mut version = 0;
    let mut deltas = 0;
    tokio::time::timeout(PATIENCE, async {
        while version < last {
            raw.read_buf(&mut buf).await.unwrap();
            while let Some(f) = codec::decode(&mut buf, codec::DEFAULT_MAX_FRAME_LEN).unwrap() {
                if let Some(Kind::Delta(d)) = f.kind {
                    assert_eq!(d.from_version, version, "deltas chain without gaps");
                    version = d.to_version;
                    deltas += 1;
                }
            }
        }
    })
    .await
    .expect("the reader caught up");
    assert_eq!(version, last);
    assert!(
        deltas < CHANGES,
        "{deltas} deltas for {CHANGES} changes: a blocked session must merge, not queue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_dropped_and_others_keep_receiving() {
    let server =
        TestServer::start_with(|c| c.session.write_timeout = Duration::from_millis(300)).await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    let (client, mut updates) = server.client(&key, TransportPreference::Quic).await;
    next_update(&mut updates).await;

    let mut raw = raw_tls(&server).await;
    raw.write_all(&codec::encode(&hello(&key))).await.unwrap();
    raw.flush().await.unwrap();
    tokio::time::timeout(PATIENCE, async {
        while server.sessions("tcp").await != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the raw session is up");

    // Push until the server gives up on the raw session (bounded: 1,000 changes).
    let mut last = 0;
    for i in 0..1000 {
        last = put_big(&server, i).await;
        if i % 20 == 19 && server.sessions("tcp").await == 0 {
            break;
        }
    }
    tokio::time::timeout(PATIENCE, async {
        while server.sessions("tcp").await != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the non-reading session was dropped");

    // The QUIC client kept up throughout (its own updates are not drained here, so watch the
    // selector rather than every update).
    let mut status = client.watch_status();
    status_until(&mut status, |s| s.selector.map(|s| s.version) == Some(last)).await;
    client.close().await;
}
