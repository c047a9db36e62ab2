//! What a person with grpcurl and no .proto files can do against a node.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use evmesh_tests::*;
use serde_json::Value;

/// Runs `grpcurl -plaintext FLAGS ADDRESS REST`.
fn grpcurl(node: &TestNode, flags: &[&str], rest: &[&str]) -> (bool, String, String) {
    let out = Command::new(require_tool("grpcurl"))
        .arg("-plaintext")
        .args(flags)
        .arg(node.addr.to_string())
        .args(rest)
        .output()
        .expect("run grpcurl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// grpcurl prints a stream of pretty JSON objects; split them.
fn json_stream(s: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(s)
        .into_iter::<Value>()
        .map(|v| v.expect("json from grpcurl"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_describe_and_health_without_protos() {
    let node = TestNode::start(Backend::Sqlite).await;
    let (ok, out, err) = grpcurl(&node, &[], &["list"]);
    assert!(ok, "{err}");
    for service in [
        "evmesh.v1.Mesh",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(out.lines().any(|l| l == service), "{service} not in {out}");
    }
    let (ok, out, err) = grpcurl(&node, &[], &["describe", "evmesh.v1.Mesh"]);
    assert!(ok, "{err}");
    for rpc in [
        "Publish",
        "PublishEvent",
        "Subscribe",
        "GetChain",
        "ListGroups",
        "SeekGroup",
        "ListDeadLetters",
        "RedriveDeadLetters",
        "PurgeDeadLetters",
    ] {
        assert!(out.contains(&format!("rpc {rpc} ")), "{rpc} not in {out}");
    }
    let (ok, out, err) = grpcurl(&node, &[], &["describe", "evmesh.v1.Event"]);
    assert!(ok, "{err}");
    assert!(out.contains(".google.protobuf.Any payload = 10;"), "{out}");
    let (ok, out, err) = grpcurl(&node, &[], &["grpc.health.v1.Health/Check"]);
    assert!(ok, "{err}");
    assert_eq!(json_stream(&out)[0]["status"], "SERVING");
    let (ok, out, err) = grpcurl(
        &node,
        &["-d", r#"{"service":"evmesh.v1.Mesh"}"#],
        &["grpc.health.v1.Health/Check"],
    );
    assert!(ok, "{err}");
    assert_eq!(json_stream(&out)[0]["status"], "SERVING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1_is_served_too() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let node = TestNode::start(Backend::Sqlite).await;
    let channel = tonic::transport::Channel::from_shared(node.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("{response:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"evmesh.v1.Mesh".to_owned()), "{names:?}");
    assert!(
        names.contains(&"grpc.reflection.v1.ServerReflection".to_owned()),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_subscribe_with_json() {
    let node = TestNode::start(Backend::Sqlite).await;
    let publish = r#"{"event": {"type": "shop.order.placed", "id": "from-grpcurl", "aggregateId": "o-1",
        "payload": {"@type": "type.googleapis.com/google.protobuf.Duration", "value": "1.5s"}}}"#;
    let (ok, out, err) = grpcurl(&node, &["-d", publish], &["evmesh.v1.Mesh/PublishEvent"]);
    assert!(ok, "{err}");
    let ack = &json_stream(&out)[0]["ack"];
    assert_eq!(ack["eventId"], "from-grpcurl");
    assert_eq!(ack["sequence"], "1");

    // A rejection is the call's status, with the field named.
    let bad = r#"{"event": {"type": "Shop", "payload": {"@type": "type.googleapis.com/google.protobuf.Empty", "value": {}}}}"#;
    let (ok, _, err) = grpcurl(&node, &["-d", bad], &["evmesh.v1.Mesh/PublishEvent"]);
    assert!(!ok);
    assert!(
        err.contains("InvalidArgument") && err.contains("event.type"),
        "{err}"
    );

    let open = r#"{"open": {"patterns": ["shop.>"], "start": {"earliest": {}}, "autoAck": true}}"#;
    let (_, out, _) = grpcurl(
        &node,
        &["-max-time", "2", "-d", open],
        &["evmesh.v1.Mesh/Subscribe"],
    );
    let messages = json_stream(&out);
    assert_eq!(messages[0]["subscribed"]["created"], true, "{out}");
    let event = &messages[1]["delivery"]["event"];
    assert_eq!(event["id"], "from-grpcurl", "{out}");
    assert_eq!(event["aggregateId"], "o-1");
    assert_eq!(event["payload"]["value"], "1.500s");
    assert_eq!(messages.len(), 2, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_payloads_of_registered_types() {
    let node = TestNode::start_with(Backend::Sqlite, evmesh_node::NodeConfig::default()).await;
    let (ok, _, _) = grpcurl(&node, &[], &["describe", "shop.v1.OrderPlaced"]);
    assert!(!ok, "not known before it is registered");
    register(
        &node,
        "shop.order.placed",
        "",
        "shop.v1.OrderPlaced",
        order_schema("string order_id = 1; int64 total_cents = 2;"),
    )
    .await
    .unwrap();
    // Reflection serves it at once.
    let (ok, out, err) = grpcurl(&node, &[], &["describe", "shop.v1.OrderPlaced"]);
    assert!(ok, "{err}");
    assert!(out.contains("string order_id = 1;"), "{out}");

    let publish = r#"{"event": {"type": "shop.order.placed",
        "payload": {"@type": "type.googleapis.com/shop.v1.OrderPlaced", "orderId": "o-1", "totalCents": "500"}}}"#;
    let (ok, out, err) = grpcurl(&node, &["-d", publish], &["evmesh.v1.Mesh/PublishEvent"]);
    assert!(ok, "{err}");
    assert_eq!(json_stream(&out)[0]["ack"]["sequence"], "1");
    // A field the schema does not have is refused by grpcurl itself, from the
    // reflected descriptor.
    let wrong = r#"{"event": {"type": "shop.order.placed",
        "payload": {"@type": "type.googleapis.com/shop.v1.OrderPlaced", "orderNumber": "o-1"}}}"#;
    let (ok, _, err) = grpcurl(&node, &["-d", wrong], &["evmesh.v1.Mesh/PublishEvent"]);
    assert!(!ok, "{err}");

    let open = r#"{"open": {"patterns": ["shop.>"], "start": {"earliest": {}}, "autoAck": true}}"#;
    let (_, out, _) = grpcurl(
        &node,
        &["-max-time", "2", "-d", open],
        &["evmesh.v1.Mesh/Subscribe"],
    );
    let messages = json_stream(&out);
    let event = &messages[1]["delivery"]["event"];
    assert_eq!(event["schemaVersion"], "1.0.0", "{out}");
    assert_eq!(
        event["payload"]["@type"],
        "type.googleapis.com/shop.v1.OrderPlaced"
    );
    assert_eq!(event["payload"]["orderId"], "o-1");
    assert_eq!(event["payload"]["totalCents"], "500");
}
