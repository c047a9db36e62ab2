//! The API serves generated clients in any language: a Python client generated from
//! proto/ with grpcio-tools registers, publishes and subscribes against a real node.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use evmesh_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_generated_with_grpcio_tools() {
    let node = TestNode::start_with(Backend::Sqlite, evmesh_node::NodeConfig::default()).await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = require_tool("python3");
    let out = tokio::process::Command::new(python)
        .arg(root.join("python/client.py"))
        .arg(root.join("../../proto"))
        .arg(node.addr.to_string())
        .output()
        .await
        .expect("run python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the Python client failed (the README's test command installs grpcio-tools):\n{stderr}"
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(seen["version"], "1.0.0");
    // The same event id three times: stored once.
    assert_eq!(seen["sequences"], serde_json::json!([1, 1, 1]));
    assert_eq!(seen["duplicates"], serde_json::json!([false, true, true]));
    assert_eq!(seen["order_id"], "o-py");
    assert_eq!(seen["total_cents"], 1234);
    assert_eq!(seen["schema_version"], "1.0.0");
    assert_eq!(seen["group"], "python-readers");
    assert_eq!(seen["rejected"]["code"], "INVALID_ARGUMENT");
    assert!(
        seen["rejected"]["details"]
            .as_str()
            .unwrap()
            .contains("event.type")
    );
}

/// Robustness item 18: grpc-python sends one small DATA frame per message, and h2
/// closes a connection (GOAWAY `too_many_data_frames`) whose unread small frames
/// cost more than its budget. Twice, two streams of 20,000 small publishes each leave their
/// acks unread for a second (the node's replies wait, and its reader behind them, so
/// the frames pile up unread, as when the node falls behind) while a unary call goes
/// over the same connection: every call must succeed and every event be acked. With
/// hyper's default windows (1 MiB each) the node sent that GOAWAY in 3 runs of 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_small_publishes_from_grpc_python_keep_their_connection() {
    let node = TestNode::start(Backend::Sqlite).await;

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = require_tool("python3");
    let (bursts, events, streams) = (2, 20_000, 2);
    let out = tokio::process::Command::new(python)
        .arg(root.join("python/burst.py"))
        .arg(root.join("../../proto"))
        .arg(node.addr.to_string())
        .args([bursts, events, streams].map(|n| n.to_string()))
        .output()
        .await
        .expect("run python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the burst client failed:\n{stderr}");
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(seen["errors"], serde_json::json!([]), "{stderr}");
    assert_eq!(seen["rejected"], serde_json::json!([]));
    assert_eq!(seen["acks"], bursts * events * streams);
}
