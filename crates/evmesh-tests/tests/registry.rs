//! The schema registry over gRPC, and payload validation at publish.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use evmesh_tests::v1 as pb;
use evmesh_tests::*;
use prost::Message;
use tonic::Code;

const V1: &str = "string order_id = 1; int64 total_cents = 2;";
const V1_1: &str = "string order_id = 1; int64 total_cents = 2; string currency = 3;";
const V2: &str = "string order_id = 1; string total = 4;";

async fn strict() -> TestNode {
    TestNode::start_with(Backend::Sqlite, evmesh_node::NodeConfig::default()).await
}

#[track_caller]
fn expect_status<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    needles: &[&str],
) {
    let status = result.expect_err("must fail");
    assert_eq!(status.code(), code, "{status:?}");
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "{:?} does not name {needle:?}",
            status.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_rules_over_grpc() {
    let node = strict().await;
    let ty = "shop.order.placed";
    let first = register(&node, ty, "", "shop.v1.OrderPlaced", order_schema(V1))
        .await
        .unwrap();
    assert!(first.created);
    assert_eq!(first.schema.as_ref().unwrap().version, "1.0.0");
    // Idempotent: the same content again, with or without the version.
    let again = register(&node, ty, "", "shop.v1.OrderPlaced", order_schema(V1))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.schema.unwrap().version, "1.0.0");
    let again = register(&node, ty, "1.0.0", "shop.v1.OrderPlaced", order_schema(V1))
        .await
        .unwrap();
    assert!(!again.created);
    // Changed content at a taken version.
    expect_status(
        register(
            &node,
            ty,
            "1.0.0",
            "shop.v1.OrderPlaced",
            order_schema(V1_1),
        )
        .await,
        Code::AlreadyExists,
        &["1.0.0", "1.1.0"],
    );
    // A new field declared as a patch: every change named, and the version it needs.
    expect_status(
        register(
            &node,
            ty,
            "1.0.1",
            "shop.v1.OrderPlaced",
            order_schema(V1_1),
        )
        .await,
        Code::FailedPrecondition,
        &[
            "FIELD_ADDED",
            "shop.v1.OrderPlaced.currency",
            "needs MINOR",
            "1.1.0",
        ],
    );
    let minor = register(&node, ty, "", "shop.v1.OrderPlaced", order_schema(V1_1))
        .await
        .unwrap();
    assert_eq!(minor.schema.unwrap().version, "1.1.0");
    assert_eq!(minor.changes.len(), 1);
    assert_eq!(minor.changes[0].rule, "FIELD_ADDED");
    // Breaking as a minor: refused; as a major: fine.
    expect_status(
        register(&node, ty, "1.2.0", "shop.v1.OrderPlaced", order_schema(V2)).await,
        Code::FailedPrecondition,
        &[
            "FIELD_NO_DELETE",
            "shop.v1.OrderPlaced.total_cents",
            "2.0.0",
        ],
    );
    // The dry run says the same, in full, and stores nothing.
    let mut registry = registry(&node).await;
    let check = registry
        .check_schema(pb::RegisterSchemaRequest {
            r#type: ty.into(),
            version: "1.2.0".into(),
            message_name: "shop.v1.OrderPlaced".into(),
            descriptor_set: order_schema(V2),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!check.compatible);
    assert_eq!(check.suggested_version, "2.0.0");
    assert_eq!(check.predecessor, "1.1.0");
    assert_eq!(check.required_bump, pb::Bump::Major as i32);
    assert_eq!(check.declared_bump, pb::Bump::Minor as i32);
    let rules: Vec<&str> = check.violations.iter().map(|v| v.rule.as_str()).collect();
    assert!(
        rules.contains(&"FIELD_NO_DELETE") && !rules.contains(&"FIELD_ADDED"),
        "{rules:?}"
    );
    assert!(
        check
            .violations
            .iter()
            .all(|v| v.against_version == "1.1.0" || v.against_version == "1.0.0")
    );
    let major = register(&node, ty, "", "shop.v1.OrderPlaced", order_schema(V2))
        .await
        .unwrap();
    assert_eq!(major.schema.unwrap().version, "2.0.0");

    let listed = registry
        .list_schemas(pb::ListSchemasRequest {
            r#type: ty.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .schemas;
    let versions: Vec<&str> = listed.iter().map(|s| s.version.as_str()).collect();
    assert_eq!(versions, ["1.0.0", "1.1.0", "2.0.0"]);
    let latest = registry
        .get_schema(pb::GetSchemaRequest {
            r#type: ty.into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (latest.version.as_str(), latest.message_name.as_str()),
        ("2.0.0", "shop.v1.OrderPlaced")
    );
    assert!(prost_types::FileDescriptorSet::decode(latest.descriptor_set.as_slice()).is_ok());
    expect_status(
        registry
            .get_schema(pb::GetSchemaRequest {
                r#type: ty.into(),
                version: "1.5.0".into(),
            })
            .await,
        Code::NotFound,
        &["1.5.0", "1.0.0, 1.1.0, 2.0.0"],
    );
    expect_status(
        registry
            .get_schema(pb::GetSchemaRequest {
                r#type: "nobody.home".into(),
                version: String::new(),
            })
            .await,
        Code::NotFound,
        &["nobody.home"],
    );

    // Registered versions survive a restart.
    let node = node.restart().await;
    let listed = registry_list(&node).await;
    assert_eq!(listed, ["1.0.0", "1.1.0", "2.0.0"]);
}

async fn registry_list(node: &TestNode) -> Vec<String> {
    registry(node)
        .await
        .list_schemas(pb::ListSchemasRequest::default())
        .await
        .unwrap()
        .into_inner()
        .schemas
        .into_iter()
        .map(|s| s.version)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_registrations_name_the_field() {
    let node = strict().await;
    let ok = order_schema(V1);
    expect_status(
        register(&node, "Bad Type", "", "shop.v1.OrderPlaced", ok.clone()).await,
        Code::InvalidArgument,
        &["type"],
    );
    expect_status(
        register(&node, "shop.x", "v1", "shop.v1.OrderPlaced", ok.clone()).await,
        Code::InvalidArgument,
        &["version"],
    );
    expect_status(
        register(&node, "shop.x", "", "", ok.clone()).await,
        Code::InvalidArgument,
        &["message_name"],
    );
    expect_status(
        register(&node, "shop.x", "", "shop.v1.Nope", ok.clone()).await,
        Code::InvalidArgument,
        &["shop.v1.Nope"],
    );
    expect_status(
        register(&node, "shop.x", "", "shop.v1.OrderPlaced", vec![]).await,
        Code::InvalidArgument,
        &["descriptor_set"],
    );
    expect_status(
        register(
            &node,
            "shop.x",
            "",
            "shop.v1.OrderPlaced",
            vec![0xff, 0xff, 0xff],
        )
        .await,
        Code::InvalidArgument,
        &["descriptor_set"],
    );
    // Not self-contained: the importing file without the imported one.
    let full = prost_types::FileDescriptorSet::decode(
        descriptor_set(&[
            ("shop/v1/money.proto", "syntax = \"proto3\";\npackage shop.v1;\nmessage Money { int64 cents = 1; }\n"),
            (
                "shop/v1/order.proto",
                "syntax = \"proto3\";\npackage shop.v1;\nimport \"shop/v1/money.proto\";\nmessage OrderPlaced { Money total = 1; }\n",
            ),
        ])
        .as_slice(),
    )
    .unwrap();
    let partial = prost_types::FileDescriptorSet {
        file: full
            .file
            .into_iter()
            .filter(|f| f.name() == "shop/v1/order.proto")
            .collect(),
    };
    expect_status(
        register(
            &node,
            "shop.x",
            "",
            "shop.v1.OrderPlaced",
            partial.encode_to_vec(),
        )
        .await,
        Code::InvalidArgument,
        &["self-contained"],
    );
    assert!(registry_list(&node).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_is_validated_against_the_schema() {
    let node = strict().await;
    let mut client = node.client().await;
    let ty = "shop.order.placed";
    register(&node, ty, "", "shop.v1.OrderPlaced", order_schema(V1))
        .await
        .unwrap();
    register(&node, ty, "", "shop.v1.OrderPlaced", order_schema(V1_1))
        .await
        .unwrap();

    // order_id = "o-1", total_cents = 500
    let valid = vec![0x0a, 0x03, b'o', b'-', b'1', 0x10, 0xf4, 0x03];
    let with = |ty: &str, version: &str, url: &str, value: Vec<u8>| pb::PublishRequest {
        event: Some(pb::Event {
            r#type: ty.into(),
            schema_version: version.into(),
            payload: Some(prost_types::Any {
                type_url: url.into(),
                value,
            }),
            ..Default::default()
        }),
    };
    let url = "type.googleapis.com/shop.v1.OrderPlaced";
    expect_status(
        client
            .publish_event(with("shop.order.unknown", "", url, valid.clone()))
            .await,
        Code::FailedPrecondition,
        &["event.type", "no registered schema"],
    );
    expect_status(
        client
            .publish_event(with(ty, "1.3.0", url, valid.clone()))
            .await,
        Code::FailedPrecondition,
        &["event.schema_version", "1.0.0, 1.1.0"],
    );
    expect_status(
        client
            .publish_event(with(
                ty,
                "",
                "type.googleapis.com/shop.v1.Other",
                valid.clone(),
            ))
            .await,
        Code::InvalidArgument,
        &[
            "event.payload.type_url",
            "shop.v1.Other",
            "shop.v1.OrderPlaced",
        ],
    );
    expect_status(
        client
            .publish_event(with(ty, "", url, vec![0x0a, 0x09, b'x']))
            .await,
        Code::InvalidArgument,
        &["event.payload.value", "does not decode"],
    );
    let mut unknown = valid.clone();
    unknown.extend([0x48, 0x01]); // field 9, varint 1
    expect_status(
        client.publish_event(with(ty, "", url, unknown)).await,
        Code::InvalidArgument,
        &["event.payload", "field number 9"],
    );
    // currency (field 3) exists in 1.1.0 only.
    let mut with_currency = valid.clone();
    with_currency.extend([0x1a, 0x03, b'E', b'U', b'R']);
    expect_status(
        client
            .publish_event(with(ty, "1.0.0", url, with_currency.clone()))
            .await,
        Code::InvalidArgument,
        &["field number 3", "1.0.0"],
    );
    let ack = publish(&mut client, with(ty, "", url, with_currency).event.unwrap()).await;
    let pinned = publish(&mut client, with(ty, "1.0.0", url, valid).event.unwrap()).await;
    // The stored events record the version they were validated against.
    let mut sub = Sub::open(&mut client, open(&[ty])).await.unwrap();
    let first = sub.next().await;
    assert_eq!(
        (first.sequence, first.event.unwrap().schema_version.as_str()),
        (ack.sequence, "1.1.0")
    );
    let second = sub.next().await;
    assert_eq!(
        (
            second.sequence,
            second.event.unwrap().schema_version.as_str()
        ),
        (pinned.sequence, "1.0.0")
    );
    // A subscription that wants ^1.1 gets the first only.
    let mut only_new = Sub::open(&mut client, open(&["shop.order.placed@^1.1"]))
        .await
        .unwrap();
    assert_eq!(only_new.next().await.sequence, ack.sequence);
    assert!(
        only_new
            .try_next(std::time::Duration::from_millis(200))
            .await
            .is_none()
    );
}
