//! The console's JSON API on a real node's HTTP listener, spoken as a browser would
//! over plain HTTP/1.1: the unary mapping and its errors, the refusal of other
//! sites' requests, and a tail that a slow reader cannot hold back (what it drops
//! it counts, and nothing goes missing from the count).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use evmesh_tests::{TestNode, event_with_id};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends a POST and returns the stream, the response's status line and headers
/// read.
async fn post(
    addr: SocketAddr,
    path: &str,
    content_type: &str,
    extra: &str,
    body: &str,
) -> (TcpStream, u16, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (stream, status, head)
}

/// A whole (non-streamed) JSON answer.
async fn call(addr: SocketAddr, method: &str, body: &str) -> (u16, serde_json::Value) {
    let (mut stream, status, head) = post(
        addr,
        &format!("/api/{method}"),
        "application/json",
        "Connection: close\r\n",
        body,
    )
    .await;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(&rest).0
    } else {
        rest
    };
    (
        status,
        serde_json::from_slice(&body).expect("a JSON answer"),
    )
}

/// The data of a chunked body so far, and whether its last chunk came.
fn dechunk(mut bytes: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(end) = bytes.windows(2).position(|w| w == b"\r\n") else {
            return (out, false);
        };
        let size = usize::from_str_radix(std::str::from_utf8(&bytes[..end]).unwrap().trim(), 16)
            .expect("a chunk size");
        if size == 0 {
            return (out, true);
        }
        let start = end + 2;
        if bytes.len() < start + size + 2 {
            return (out, false);
        }
        out.extend_from_slice(&bytes[start..start + size]);
        bytes = &bytes[start + size + 2..];
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_methods_map_to_json_with_their_statuses() {
    let node = TestNode::start_with_http(evmesh_node::NodeConfig {
        allow_unregistered: true,
        ..evmesh_node::NodeConfig::default()
    })
    .await;
    let http = node.http.unwrap();
    let mut client = node.client().await;
    let ack = evmesh_tests::publish(&mut client, event_with_id("app.thing.done", "e-1")).await;

    let (status, chain) = call(
        http,
        "evmesh.v1.Mesh/GetChain",
        r#"{"correlation_id": "e-1"}"#,
    )
    .await;
    assert_eq!(status, 200, "{chain}");
    let events = chain["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["sequence"], ack.sequence.to_string());
    assert_eq!(events[0]["event"]["type"], "app.thing.done");
    // No schema: the payload's bytes, and why they are not JSON.
    let payload = &events[0]["event"]["payload"];
    assert!(payload["@value"].is_string(), "{payload}");
    assert!(
        payload["@error"]
            .as_str()
            .unwrap()
            .contains("no schema is registered"),
        "{payload}"
    );

    let (status, refused) = call(
        http,
        "evmesh.v1.Mesh/ListGroups",
        r#"{"limit": 5, "colour": "red"}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(refused["code"], "INVALID_ARGUMENT");
    assert!(
        refused["message"].as_str().unwrap().contains("colour"),
        "{refused}"
    );

    let (status, missing) = call(
        http,
        "evmesh.v1.SchemaRegistry/GetSchema",
        r#"{"type": "app.thing.done"}"#,
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(missing["code"], "NOT_FOUND");

    let (status, streams) = call(http, "evmesh.v1.Mesh/Publish", "{}").await;
    assert_eq!(status, 501, "{streams}");
    let (status, nothing) = call(http, "grpc.health.v1.Health/Check", "{}").await;
    assert_eq!(status, 404, "{nothing}");

    // What another site's page could make a browser send is refused.
    let (_, status, _) = post(
        http,
        "/api/evmesh.v1.Mesh/DeleteGroup",
        "text/plain",
        "",
        r#"{"group": "billing"}"#,
    )
    .await;
    assert_eq!(status, 400);
    let (_, status, _) = post(
        http,
        "/api/evmesh.v1.Mesh/DeleteGroup",
        "application/json",
        "Origin: https://evil.example\r\n",
        r#"{"group": "billing"}"#,
    )
    .await;
    assert_eq!(status, 403);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_tail_drops_and_counts_instead_of_holding_the_node_back() {
    let node = TestNode::start_with_http(evmesh_node::NodeConfig {
        allow_unregistered: true,
        ..evmesh_node::NodeConfig::default()
    })
    .await;
    let http = node.http.unwrap();
    let (mut tail, status, head) = post(
        http,
        "/api/evmesh.v1.Mesh/Subscribe",
        "application/json",
        "",
        r#"{"open": {"patterns": ["app.>"], "auto_ack": true}}"#,
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&head));
    let mut body = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    // Subscribed first.
    while !String::from_utf8_lossy(&dechunk(&body).0).contains("\"subscribed\"") {
        let n = tail.read(&mut buf).await.unwrap();
        body.extend_from_slice(&buf[..n]);
    }

    // Far more than the tail's buffer and the socket's hold, while nobody reads.
    let mut client = node.client().await;
    const BULK: usize = 20_000;
    let events: Vec<_> = (0..BULK)
        .map(|i| {
            let mut e = event_with_id("app.bulk.sent", &format!("bulk-{i}"));
            e.payload.as_mut().unwrap().value = vec![7; 2048];
            e
        })
        .collect();
    for chunk in events.chunks(2_000) {
        evmesh_tests::publish_stream(&mut client, chunk.to_vec()).await;
    }
    // The node went on: the publishes are all acked. Now the reader catches up,
    // and one more event makes the tail report what it dropped.
    let drain = async {
        loop {
            let n = tail.read(&mut buf).await.unwrap();
            body.extend_from_slice(&buf[..n]);
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), drain).await;
    evmesh_tests::publish(&mut client, event_with_id("app.last.sent", "last")).await;
    let mut lines: Vec<serde_json::Value> = Vec::new();
    for _ in 0..200 {
        lines = String::from_utf8(dechunk(&body).0)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.iter().any(|l| l["delivery"]["event"]["id"] == "last") {
            break;
        }
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(100), tail.read(&mut buf)).await
        {
            body.extend_from_slice(&buf[..n]);
        }
    }
    let delivered = lines
        .iter()
        .filter(|l| l["delivery"]["event"]["type"] == "app.bulk.sent")
        .count();
    let dropped = lines
        .iter()
        .filter_map(|l| l["dropped"].as_u64())
        .max()
        .unwrap_or(0);
    assert!(
        lines.iter().any(|l| l["delivery"]["event"]["id"] == "last"),
        "the tail goes on after dropping"
    );
    assert!(
        dropped > 0,
        "a reader this slow drops ({delivered} delivered)"
    );
    assert_eq!(
        delivered as u64 + dropped,
        BULK as u64,
        "every event is either delivered or counted as dropped"
    );
    drop(tail);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tails_are_capped_and_a_closed_one_frees_its_place() {
    let node = TestNode::start_with_http(evmesh_node::NodeConfig::default()).await;
    let http = node.http.unwrap();
    let open = r#"{"open": {"patterns": ["app.>"], "auto_ack": true}}"#;
    let tail = || async move {
        post(
            http,
            "/api/evmesh.v1.Mesh/Subscribe",
            "application/json",
            "",
            open,
        )
        .await
    };
    let mut tails = Vec::new();
    for _ in 0..64 {
        let (tail, status, _) = tail().await;
        assert_eq!(status, 200);
        tails.push(tail);
    }
    let (mut refused, status, _) = post(
        http,
        "/api/evmesh.v1.Mesh/Subscribe",
        "application/json",
        "Connection: close\r\n",
        open,
    )
    .await;
    assert_eq!(status, 429);
    let mut body = Vec::new();
    refused.read_to_end(&mut body).await.unwrap();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("RESOURCE_EXHAUSTED") && body.contains("64 tails are open"),
        "{body}"
    );
    // A browser that goes away gives its place back.
    drop(tails.pop());
    evmesh_tests::eventually("a closed tail's place is free again", || async move {
        let (_tail, status, _) = tail().await;
        (status == 200).then_some(())
    })
    .await;
    drop(tails);
    node.stop().await;
}
