//! The node under attack over its public API: every input has a bound, every
//! handler is panic-free, every reply fits its limit, and no single client or event
//! stops others. Each test names the item of the robustness issue it keeps fixed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::{Buf, BufMut};
use evmesh_schema::fixtures::{CHAIN_ROOT, chain};
use evmesh_tests::v1 as pb;
use evmesh_tests::*;
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{
    DescriptorProto, FieldDescriptorProto, FileDescriptorProto, FileDescriptorSet, MessageOptions,
};
use tonic::Code;

/// A status message that quotes what it refuses stays this short, whatever was sent.
const SHORT: usize = 1024;

#[track_caller]
fn refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} does not name {needle:?}",
        status.message()
    );
    assert!(
        status.message().len() < SHORT,
        "a {}-byte status message",
        status.message().len()
    );
}

fn check_request(ty: &str, message: &str, set: Vec<u8>) -> pb::RegisterSchemaRequest {
    pb::RegisterSchemaRequest {
        r#type: ty.into(),
        version: String::new(),
        message_name: message.into(),
        descriptor_set: set,
    }
}

fn field(name: &str, number: i32, ty: Type) -> FieldDescriptorProto {
    FieldDescriptorProto {
        name: Some(name.into()),
        number: Some(number),
        label: Some(Label::Optional as i32),
        r#type: Some(ty as i32),
        ..Default::default()
    }
}

fn typed(name: &str, number: i32, ty: Type, type_name: &str) -> FieldDescriptorProto {
    FieldDescriptorProto {
        type_name: Some(type_name.into()),
        ..field(name, number, ty)
    }
}

fn message(name: &str, fields: Vec<FieldDescriptorProto>) -> DescriptorProto {
    DescriptorProto {
        name: Some(name.into()),
        field: fields,
        ..Default::default()
    }
}

fn file(name: &str, syntax: &str, messages: Vec<DescriptorProto>) -> FileDescriptorProto {
    FileDescriptorProto {
        name: Some(name.into()),
        package: Some("bad.v1".into()),
        syntax: Some(syntax.into()),
        message_type: messages,
        ..Default::default()
    }
}

fn encoded(files: Vec<FileDescriptorProto>) -> Vec<u8> {
    FileDescriptorSet { file: files }.encode_to_vec()
}

/// `bad.v1.Root` with one map field whose entry is `entry`.
fn with_map_entry(entry: DescriptorProto, label: Label) -> Vec<u8> {
    let mut root = message(
        "Root",
        vec![FieldDescriptorProto {
            label: Some(label as i32),
            ..typed("tags", 1, Type::Message, ".bad.v1.Root.TagsEntry")
        }],
    );
    root.nested_type.push(DescriptorProto {
        options: Some(MessageOptions {
            map_entry: Some(true),
            ..Default::default()
        }),
        ..entry
    });
    encoded(vec![file("bad.proto", "proto3", vec![root])])
}

/// Items 1 and 21: a type graph thousands of messages deep is compared on the heap,
/// off the runtime, and so are a hundred thousand reserved ranges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_takes_deep_and_wide_schemas() {
    let node = TestNode::start(Backend::Sqlite).await;
    register(&node, "abuse.chain", "", CHAIN_ROOT, chain(3000, false))
        .await
        .expect("a chain of 3000 messages registers");
    let mut registry = registry(&node).await;
    let verdict = registry
        .check_schema(check_request("abuse.chain", CHAIN_ROOT, chain(3000, true)))
        .await
        .expect("a chain of 3000 messages is compared")
        .into_inner();
    assert!(verdict.compatible);
    assert_eq!(verdict.required_bump, pb::Bump::Minor as i32);
    let changed = register(&node, "abuse.chain", "", CHAIN_ROOT, chain(3000, true))
        .await
        .expect("and registers");
    assert_eq!(changed.schema.unwrap().version, "1.1.0");

    let ranges = |n: i32| {
        let mut root = message("Root", vec![field("id", 1, Type::String)]);
        root.reserved_range = (0..n)
            .map(|i| prost_types::descriptor_proto::ReservedRange {
                start: Some(10 + 2 * i),
                end: Some(11 + 2 * i),
            })
            .collect();
        encoded(vec![file("ranges.proto", "proto3", vec![root])])
    };
    register(&node, "abuse.ranges", "", "bad.v1.Root", ranges(100_000))
        .await
        .expect("100,000 reserved ranges register");
    let verdict = registry
        .check_schema(check_request("abuse.ranges", "bad.v1.Root", ranges(99_000)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(verdict.required_bump, pb::Bump::Major as i32);
    let lost = verdict
        .changes
        .iter()
        .find(|c| c.rule == "RESERVED_MESSAGE_NO_DELETE")
        .expect("the lost ranges are a change");
    assert!(lost.message.contains("and 992 more"), "{}", lost.message);
    let channel = tonic::transport::Channel::from_shared(node.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("the node still answers");
}

/// Items 13 and 19: descriptor sets protoc would refuse are refused with
/// INVALID_ARGUMENT naming the fault, never a panic or an acceptance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_descriptor_sets_are_refused() {
    let node = TestNode::start(Backend::Sqlite).await;
    let root = || message("Root", vec![field("id", 1, Type::String)]);
    let entry = |fields| DescriptorProto {
        name: Some("TagsEntry".into()),
        field: fields,
        ..Default::default()
    };
    let mut cycle_a = file("a.proto", "proto3", vec![root()]);
    cycle_a.dependency = vec!["b.proto".into()];
    let mut cycle_b = file("b.proto", "proto3", vec![]);
    cycle_b.package = Some("other.v1".into());
    cycle_b.dependency = vec!["a.proto".into()];
    let mut group = root();
    group.field.push(typed("g", 2, Type::Group, ".bad.v1.Root"));
    let mut bad_name = root();
    bad_name.field.push(field("has space", 2, Type::String));
    let mut no_name = root();
    no_name.field.push(field("", 3, Type::String));
    let enum_file = |fields| {
        let mut f = file("e.proto", "proto3", vec![message("Root", fields)]);
        f.enum_type.push(prost_types::EnumDescriptorProto {
            name: Some("Color".into()),
            value: vec![prost_types::EnumValueDescriptorProto {
                name: Some("COLOR_UNSPECIFIED".into()),
                number: Some(0),
                ..Default::default()
            }],
            ..Default::default()
        });
        encoded(vec![f])
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "syntax proto4",
            encoded(vec![file("s.proto", "proto4", vec![root()])]),
            "unknown syntax",
        ),
        (
            "syntax editions",
            encoded(vec![file("s.proto", "editions", vec![root()])]),
            "editions are not supported",
        ),
        (
            "an import cycle",
            encoded(vec![cycle_a, cycle_b]),
            "import cycle",
        ),
        (
            "a map entry without a value",
            with_map_entry(entry(vec![field("key", 1, Type::String)]), Label::Repeated),
            "key = 1 and a field value = 2",
        ),
        (
            "a map with a message key",
            with_map_entry(
                entry(vec![
                    typed("key", 1, Type::Message, ".bad.v1.Root"),
                    field("value", 2, Type::String),
                ]),
                Label::Repeated,
            ),
            "a map key must be",
        ),
        (
            "map_entry on a singular field",
            with_map_entry(
                entry(vec![
                    field("key", 1, Type::String),
                    field("value", 2, Type::String),
                ]),
                Label::Optional,
            ),
            "is a map entry",
        ),
        (
            "a message-typed field naming an enum",
            enum_file(vec![typed("color", 1, Type::Message, ".bad.v1.Color")]),
            "names an enum",
        ),
        (
            "a group in proto3",
            encoded(vec![file("g.proto", "proto3", vec![group])]),
            "groups are not allowed in proto3",
        ),
        (
            "a malformed field name",
            encoded(vec![file("n.proto", "proto3", vec![bad_name])]),
            "is not an identifier",
        ),
        (
            "an empty field name",
            encoded(vec![file("n.proto", "proto3", vec![no_name])]),
            "is not an identifier",
        ),
        (
            "an empty file name",
            encoded(vec![file("", "proto3", vec![root()])]),
            "empty name",
        ),
    ];
    let mut registry = registry(&node).await;
    for (what, set, needle) in cases {
        let result = registry
            .check_schema(check_request("abuse.bad", "bad.v1.Root", set.clone()))
            .await;
        let status = result.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{what}: {:?} does not say {needle:?}",
            status.message()
        );
        refused(
            register(&node, "abuse.bad", "", "bad.v1.Root", set).await,
            Code::InvalidArgument,
            needle,
        );
    }
    // An empty syntax is proto2, as protoc reads it.
    register(
        &node,
        "abuse.proto2",
        "",
        "bad.v1.Root",
        encoded(vec![file("p.proto", "", vec![root()])]),
    )
    .await
    .expect("an empty syntax registers as proto2");
}

/// Item 19: a proto2 payload must carry its required fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_fields_are_enforced_at_publish() {
    let node = TestNode::start(Backend::Sqlite).await;
    let set = descriptor_set(&[(
        "req.proto",
        "syntax = \"proto2\";\npackage req.v1;\nmessage Item { required string sku = 1; }\n\
         message Order { required string id = 1; repeated Item items = 2; }\n",
    )]);
    register(&node, "abuse.required", "", "req.v1.Order", set)
        .await
        .unwrap();
    let mut client = node.client().await;
    let with = |value: Vec<u8>| pb::PublishRequest {
        event: Some(pb::Event {
            r#type: "abuse.required".into(),
            payload: Some(prost_types::Any {
                type_url: "type.googleapis.com/req.v1.Order".into(),
                value,
            }),
            ..Default::default()
        }),
    };
    // Order { items: [Item {}] }: id and items[0].sku missing.
    let missing = client.publish_event(with(vec![0x12, 0x00])).await;
    refused(
        missing,
        Code::InvalidArgument,
        "event.payload.id is required",
    );
    // Order { id: "o" , items: [Item { sku: "s" }] }
    let whole = vec![0x0a, 0x01, b'o', 0x12, 0x03, 0x0a, 0x01, b's'];
    client
        .publish_event(with(whole))
        .await
        .expect("a payload with its required fields");
}

/// Item 20: a registration cannot shadow the node's own API, and two types whose
/// files share a name each resolve to their own content through reflection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_cannot_shadow_reflection() {
    let node = TestNode::start(Backend::Sqlite).await;
    let shadow = descriptor_set(&[(
        "evil.proto",
        "syntax = \"proto3\";\npackage evmesh.v1;\nmessage Evil { string id = 1; }\n\
         service Mesh { rpc Publish(Evil) returns (Evil); }\n",
    )]);
    refused(
        register(&node, "abuse.evil", "", "evmesh.v1.Evil", shadow).await,
        Code::InvalidArgument,
        "the node's own API defines",
    );
    let options = descriptor_set(&[(
        "evmesh/v1/envelope.proto",
        "syntax = \"proto3\";\npackage mine.v1;\nmessage Mine { string id = 1; }\n",
    )]);
    refused(
        register(&node, "abuse.mine", "", "mine.v1.Mine", options).await,
        Code::InvalidArgument,
        "a file of the node's own API",
    );

    let common = |package: &str, field: &str| {
        descriptor_set(&[
            (
                "common.proto",
                &format!(
                    "syntax = \"proto3\";\npackage {package};\nmessage Money {{ int64 {field} = 1; }}\n"
                ),
            ),
            (
                &format!("{package}.proto"),
                &format!(
                    "syntax = \"proto3\";\npackage {package};\nimport \"common.proto\";\n\
                     message Thing {{ Money price = 1; }}\n"
                ),
            ),
        ])
    };
    register(&node, "abuse.a", "", "a.Thing", common("a", "cents"))
        .await
        .unwrap();
    register(&node, "abuse.b", "", "b.Thing", common("b", "pennies"))
        .await
        .unwrap();
    for (symbol, field) in [("a.Money", "cents"), ("b.Money", "pennies")] {
        let out = std::process::Command::new(require_tool("grpcurl"))
            .args(["-plaintext", &node.addr.to_string(), "describe", symbol])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(field),
            "{symbol}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Items 3 and 14: a schema's size, types and versions are bounded, and a verdict
/// lists at most a thousand changes, counting the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_are_bounded() {
    let mut config = evmesh_node::NodeConfig::default();
    config.registry.max_versions = 2;
    config.registry.schema.max_types = 50;
    let node = TestNode::start_with(Backend::Sqlite, config).await;
    refused(
        register(&node, "abuse.big", "", CHAIN_ROOT, chain(60, false)).await,
        Code::ResourceExhausted,
        "at most 50 allowed",
    );
    let huge = vec![0u8; 1024 * 1024 + 1];
    refused(
        register(&node, "abuse.big", "", CHAIN_ROOT, huge).await,
        Code::ResourceExhausted,
        "descriptor_set is 1048577 bytes",
    );
    let fields = |n: usize| {
        let body: String = (1..=n).map(|i| format!("int32 f{i} = {i}; ")).collect();
        order_schema(&body)
    };
    register(
        &node,
        "abuse.versions",
        "",
        "shop.v1.OrderPlaced",
        fields(1),
    )
    .await
    .unwrap();
    let wide = registry(&node)
        .await
        .check_schema(check_request(
            "abuse.versions",
            "shop.v1.OrderPlaced",
            fields(3001),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(wide.changes.len(), 1000);
    assert_eq!(wide.omitted_changes, 2000);
    register(
        &node,
        "abuse.versions",
        "",
        "shop.v1.OrderPlaced",
        fields(2),
    )
    .await
    .unwrap();
    refused(
        register(
            &node,
            "abuse.versions",
            "",
            "shop.v1.OrderPlaced",
            fields(3),
        )
        .await,
        Code::ResourceExhausted,
        "at most 2 allowed",
    );
}

/// Item 3: only each type's latest version stays compiled; an event naming an older
/// version is validated against that version all the same (compiled on demand),
/// before and after a restart, and a version registered between two others too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_versions_validate_on_demand() {
    let mut node = TestNode::start(Backend::Sqlite).await;
    let bodies = [
        "string id = 1;",
        "string id = 1; string note = 2;",
        "string id = 1; string note = 2; int64 cents = 3;",
    ];
    for (version, body) in ["1.0.0", "1.2.0", "1.3.0"].iter().zip(bodies) {
        register(
            &node,
            "abuse.old",
            version,
            "shop.v1.OrderPlaced",
            order_schema(body),
        )
        .await
        .unwrap();
    }
    // 1.1.0 goes in between: the same content as 1.2.0, a minor step from 1.0.0.
    register(
        &node,
        "abuse.old",
        "1.1.0",
        "shop.v1.OrderPlaced",
        order_schema(bodies[1]),
    )
    .await
    .unwrap();
    // note = "x" (field 2), then cents = 5 (field 3).
    let note = vec![0x12, 0x01, b'x'];
    let cents = vec![0x18, 0x05];
    for round in 0..2 {
        let mut client = node.client().await;
        for (version, payload, fits) in [
            ("1.0.0", note.clone(), false),
            ("1.1.0", note.clone(), true),
            ("1.1.0", cents.clone(), false),
            ("1.2.0", cents.clone(), false),
            ("1.3.0", cents.clone(), true),
            ("", cents.clone(), true),
        ] {
            let mut e = event("abuse.old");
            e.schema_version = version.into();
            e.payload = Some(prost_types::Any {
                type_url: "type.googleapis.com/shop.v1.OrderPlaced".into(),
                value: payload,
            });
            let responses = publish_stream(&mut client, vec![e]).await;
            let accepted = matches!(
                responses[0].result,
                Some(pb::publish_response::Result::Ack(_))
            );
            assert_eq!(
                accepted, fits,
                "round {round}, version {version:?}: {:?}",
                responses[0]
            );
        }
        node = node.restart().await;
    }
}

/// Items 7 and 16: every envelope field is bounded, so the largest event a node
/// accepts is also delivered; out-of-range times and versions are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_event_is_deliverable() {
    // TestNode::start takes unregistered types, as this test's opaque payloads are.
    let node = TestNode::start(Backend::Sqlite).await;
    let limits = node.config.limits.clone();
    let mut client = node.client().await;
    let mut largest = pb::Event {
        id: "i".repeat(limits.max_id_len),
        r#type: format!("abuse.{}", "x".repeat(evmesh_store::MAX_TYPE_LEN - 6)),
        source: "s".repeat(limits.max_field_len),
        aggregate_id: "a".repeat(limits.max_field_len),
        correlation_id: "c".repeat(limits.max_field_len),
        causation_id: "d".repeat(limits.max_field_len),
        payload: Some(prost_types::Any {
            type_url: format!("t/{}", "u".repeat(limits.max_type_url_len - 2)),
            value: vec![7; limits.max_payload_bytes],
        }),
        ..Default::default()
    };
    let header_value = limits.max_header_bytes / limits.max_headers - 8;
    largest.headers = (0..limits.max_headers)
        .map(|i| (format!("h{i:06}"), "v".repeat(header_value)))
        .collect();
    let mut sub = Sub::open(&mut client, open(&["abuse.>"])).await.unwrap();
    let ack = publish(&mut client, largest).await;
    let delivered = sub.next().await;
    assert_eq!(delivered.sequence, ack.sequence);

    let with = |edit: &dyn Fn(&mut pb::Event)| {
        let mut e = event("abuse.refused");
        edit(&mut e);
        pb::PublishRequest { event: Some(e) }
    };
    let time = |seconds, nanos| Some(prost_types::Timestamp { seconds, nanos });
    let cases: Vec<(pb::PublishRequest, &str)> = vec![
        (
            with(&|e| e.payload.as_mut().unwrap().type_url = "t/".repeat(2 * 1024 * 1024)),
            "event.payload.type_url is 4194304 bytes long",
        ),
        (
            with(&|e| e.occurred_at = time(i64::MAX, 0)),
            "event.occurred_at",
        ),
        (
            with(&|e| e.occurred_at = time(i64::MIN, 0)),
            "event.occurred_at",
        ),
        (with(&|e| e.occurred_at = time(0, -1)), "event.occurred_at"),
        (
            with(&|e| e.occurred_at = time(0, 2_000_000_000)),
            "event.occurred_at",
        ),
        (
            with(&|e| e.schema_version = format!("1.0.0+{}", "m".repeat(1024 * 1024))),
            "event.schema_version",
        ),
        (
            with(&|e| {
                e.schema_version =
                    "18446744073709551615.18446744073709551615.18446744073709551615".into()
            }),
            "has a number over",
        ),
        (
            with(&|e| e.r#type = "T".repeat(1024 * 1024)),
            "is 1048576 bytes long",
        ),
    ];
    for (request, needle) in cases {
        let code = if needle.starts_with("event.payload.type_url") {
            // 4 MiB of type_url is over the request size limit itself.
            Code::ResourceExhausted
        } else {
            Code::InvalidArgument
        };
        let result = client.publish_event(request).await;
        if code == Code::ResourceExhausted {
            assert_eq!(result.unwrap_err().code(), code);
        } else {
            refused(result, code, needle);
        }
    }
    refused(
        client
            .publish_event(with(&|e| {
                e.payload.as_mut().unwrap().type_url = format!("t/{}", "u".repeat(4000))
            }))
            .await,
        Code::InvalidArgument,
        "event.payload.type_url is 4002 bytes long",
    );
    // Nothing refused reached the log: the subscriber's next event is the next one.
    let next = publish(&mut client, event("abuse.after")).await;
    assert_eq!(sub.next().await.sequence, next.sequence);
}

/// Item 15: what a status quotes of its input is short; the code is the one meant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_quote_a_short_prefix() {
    let node = TestNode::start(Backend::Sqlite).await;
    let mb = "x".repeat(1024 * 1024);
    let mut registry = registry(&node).await;
    refused(
        registry
            .get_schema(pb::GetSchemaRequest {
                r#type: mb.clone(),
                version: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "type",
    );
    refused(
        registry
            .get_schema(pb::GetSchemaRequest {
                r#type: "abuse.none".into(),
                version: format!("1.0.0-{mb}"),
            })
            .await,
        Code::InvalidArgument,
        "version",
    );
    refused(
        register(&node, &mb, "", "a.B", order_schema("string id = 1;")).await,
        Code::InvalidArgument,
        "type",
    );
    refused(
        register(&node, "abuse.name", "", &mb, order_schema("string id = 1;")).await,
        Code::InvalidArgument,
        "message_name",
    );
    refused(
        register(
            &node,
            "abuse.name",
            "",
            &"a".repeat(1000),
            order_schema("string id = 1;"),
        )
        .await,
        Code::InvalidArgument,
        "is not in descriptor_set",
    );
    let mut client = node.client().await;
    refused(
        Sub::open(&mut client, open(&[&mb])).await.map(|_| ()),
        Code::InvalidArgument,
        "open.patterns",
    );
    refused(
        Sub::open(&mut client, open(&[&format!("a.b@{mb}")]))
            .await
            .map(|_| ()),
        Code::InvalidArgument,
        "open.patterns",
    );
    let many: Vec<String> = (0..65).map(|i| format!("a.p{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    refused(
        Sub::open(&mut client, open(&many)).await.map(|_| ()),
        Code::InvalidArgument,
        "at most 64 allowed",
    );
    let mut grouped = open(&["a.b"]);
    grouped.group = mb.clone();
    refused(
        Sub::open(&mut client, grouped).await.map(|_| ()),
        Code::InvalidArgument,
        "open.group",
    );
}

/// Items 8 and 12: ack timeouts and nack delays are bounded; a bad nack ends only
/// its own subscription, and the group's other members go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_are_bounded() {
    let node = TestNode::start(Backend::Sqlite).await;
    let mut client = node.client().await;
    let mut forever = open(&["abuse.d"]);
    forever.group = "abuse.forever".into();
    forever.ack_timeout = Some(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 0,
    });
    refused(
        Sub::open(&mut client, forever).await.map(|_| ()),
        Code::InvalidArgument,
        "open.ack_timeout",
    );

    let mut member = open(&["abuse.d"]);
    member.group = "abuse.nacks".into();
    for (seconds, nanos) in [(i64::MAX, 0), (-1, 0)] {
        let mut bad = Sub::open(&mut client, member.clone()).await.unwrap();
        let ack = publish(&mut client, event("abuse.d")).await;
        assert_eq!(bad.next().await.sequence, ack.sequence);
        let mut good = Sub::open(&mut client, member.clone()).await.unwrap();
        bad.send(pb::subscribe_request::Request::Nack(pb::Nack {
            sequences: vec![ack.sequence],
            delay: Some(prost_types::Duration { seconds, nanos }),
            reason: "x".into(),
        }))
        .await;
        let status = bad.ended().await;
        refused(Err::<(), _>(status), Code::InvalidArgument, "nack.delay");
        // The other member keeps the group going, the nacked event included.
        let d = good.next().await;
        assert_eq!(d.sequence, ack.sequence);
        good.ack(&[d.sequence]).await;
        eventually("the group settles", || {
            let mut client = client.clone();
            async move {
                let info = group_info(&mut client, "abuse.nacks").await;
                (info.lag == 0 && info.pending == 0).then_some(())
            }
        })
        .await;
    }
}

/// Item 6: a payload with 200,000 violations lists a few and counts the rest; the
/// status fits, and a publish stream goes on after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn violations_are_capped() {
    let node = TestNode::start(Backend::Sqlite).await;
    register(
        &node,
        "abuse.items",
        "",
        "shop.v1.OrderPlaced",
        descriptor_set(&[(
            "shop/v1/order.proto",
            "syntax = \"proto3\";\npackage shop.v1;\nmessage Item { string sku = 1; }\n\
             message OrderPlaced { repeated Item items = 1; }\n",
        )]),
    )
    .await
    .unwrap();
    // 200,000 items, each with unknown field 15 set to 1.
    let bomb: Vec<u8> = std::iter::repeat_n([0x0a, 0x02, 0x78, 0x01], 200_000)
        .flatten()
        .collect();
    let with = |value: Vec<u8>| pb::Event {
        r#type: "abuse.items".into(),
        payload: Some(prost_types::Any {
            type_url: "type.googleapis.com/shop.v1.OrderPlaced".into(),
            value,
        }),
        ..Default::default()
    };
    let mut client = node.client().await;
    let responses = publish_stream(&mut client, vec![with(bomb), with(vec![])]).await;
    let Some(pb::publish_response::Result::Rejection(rejection)) = &responses[0].result else {
        panic!("the bomb must be rejected: {:?}", responses[0]);
    };
    assert_eq!(rejection.code, Code::InvalidArgument as i32);
    assert_eq!(rejection.violations.len(), 33);
    assert!(
        rejection.violations[32]
            .message
            .contains("and 199968 more violations"),
        "{:?}",
        rejection.violations[32]
    );
    ack_of(&responses[1]);
}

/// Item 14: a chain or dead-letter reply fits a client's 4 MiB, and pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_replies_page() {
    let node = TestNode::start(Backend::Sqlite).await;
    let mut client = node.client().await;
    for i in 0..6 {
        let mut e = event_with_id("abuse.big", &format!("big-{i}"));
        e.correlation_id = "big-chain".into();
        e.payload.as_mut().unwrap().value = vec![1; 1024 * 1024];
        publish(&mut client, e).await;
    }
    let mut seen = Vec::new();
    loop {
        let page = client
            .get_chain(pb::GetChainRequest {
                correlation_id: "big-chain".into(),
                limit: 0,
                after_sequence: seen.last().copied().unwrap_or(0),
            })
            .await
            .expect("a page that fits")
            .into_inner();
        assert!(
            page.events.len() <= 3,
            "{} events in a page",
            page.events.len()
        );
        seen.extend(page.events.iter().map(|e| e.sequence));
        if !page.more {
            break;
        }
    }
    assert_eq!(seen, (1..=6).collect::<Vec<u64>>());
}

/// Item 17: a string that is not UTF-8 is INVALID_ARGUMENT naming the field, on the
/// unary call and on a publish stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_names_the_field() {
    let node = TestNode::start(Backend::Sqlite).await;
    let mut e = event("abuse.utf8");
    e.source = "\u{1}\u{1}".into();
    let mut bytes = pb::PublishRequest { event: Some(e) }.encode_to_vec();
    let at = bytes
        .windows(2)
        .position(|w| w == [1, 1])
        .expect("the marker");
    bytes[at] = 0xff;
    bytes[at + 1] = 0xfe;
    let channel = tonic::transport::Channel::from_shared(node.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let unary = grpc
        .unary(
            tonic::Request::new(bytes.clone()),
            http::uri::PathAndQuery::from_static("/evmesh.v1.Mesh/PublishEvent"),
            Raw,
        )
        .await;
    refused(unary, Code::InvalidArgument, "event.source does not decode");
    grpc.ready().await.unwrap();
    let stream = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter(vec![bytes])),
            http::uri::PathAndQuery::from_static("/evmesh.v1.Mesh/Publish"),
            Raw,
        )
        .await
        .expect("the stream opens");
    let mut stream = stream.into_inner();
    refused(
        stream.message().await,
        Code::InvalidArgument,
        "event.source does not decode",
    );
}

/// Reads until the node closes the connection; panics when it stays open.
async fn closed_by_the_node(mut tcp: tokio::net::TcpStream, what: &str) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0; 4096];
    tokio::time::timeout(PATIENCE, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: the node kept the connection open"));
}

async fn health(channel: tonic::transport::Channel) -> Result<(), tonic::Status> {
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .map(|_| ())
}

/// Item 9: a connection that does not complete the HTTP/2 handshake in time is
/// closed, so is an idle one that answers no ping, and the connection cap holds,
/// while well-behaved clients are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_bounded() {
    use tokio::io::AsyncWriteExt;
    let mut config = evmesh_node::NodeConfig::default();
    config.connections.handshake_timeout = std::time::Duration::from_millis(300);
    config.connections.keepalive_interval = std::time::Duration::from_millis(300);
    config.connections.keepalive_timeout = std::time::Duration::from_millis(300);
    config.connections.max_connections = 3;
    let node = TestNode::start_with(Backend::Sqlite, config).await;
    let connect = || tokio::net::TcpStream::connect(node.addr);

    let silent = connect().await.unwrap();
    closed_by_the_node(silent, "a silent connection").await;
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut only_preface = connect().await.unwrap();
    only_preface.write_all(preface).await.unwrap();
    closed_by_the_node(only_preface, "a connection that sent only the preface").await;
    let mut half = connect().await.unwrap();
    half.write_all(preface).await.unwrap();
    // An empty SETTINGS frame, then HEADERS on stream 1 without END_HEADERS.
    half.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    half.write_all(&[0, 0, 1, 1, 0, 0, 0, 0, 1, 0x82])
        .await
        .unwrap();
    closed_by_the_node(half, "a connection with half a header block").await;

    let channel = || async {
        tonic::transport::Channel::from_shared(node.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    };
    let (a, b, c) = (channel().await, channel().await, channel().await);
    for ch in [&a, &b, &c] {
        health(ch.clone()).await.expect("within the cap");
    }
    closed_by_the_node(connect().await.unwrap(), "a connection over the cap").await;
    drop(a);
    eventually("a place under the cap again", || async {
        let d = tonic::transport::Channel::from_shared(node.url())
            .unwrap()
            .connect()
            .await
            .ok()?;
        health(d.clone()).await.ok().map(|()| d)
    })
    .await;
    health(b)
        .await
        .expect("the clients within the cap are still served");
}

/// Item 5: the streams one connection may open at once are capped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_connection_are_capped() {
    let mut config = evmesh_node::NodeConfig::default();
    config.connections.max_streams_per_connection = 2;
    let node = TestNode::start_with(Backend::Sqlite, config).await;
    let mut client = node.client().await;
    let first = Sub::open(&mut client, open(&["abuse.s"])).await.unwrap();
    let _second = Sub::open(&mut client, open(&["abuse.s"])).await.unwrap();
    let third = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        Sub::open(&mut client, open(&["abuse.s"])),
    )
    .await;
    assert!(
        third.is_err(),
        "a third stream opened on a connection capped at two"
    );
    drop(first);
    Sub::open(&mut client, open(&["abuse.s"]))
        .await
        .expect("a stream once one has closed");
}

/// Sends and receives message bytes as they are, to say what a typed client cannot.
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// Items 4 and 14: a group can be deleted once its members left, with its dead
/// letters; group lists page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_deleted_and_listed_in_pages() {
    let node = TestNode::start(Backend::Sqlite).await;
    let mut client = node.client().await;
    let mut doomed = open(&["abuse.del"]);
    doomed.group = "abuse.doomed".into();
    doomed.max_deliveries = 1;
    let mut member = Sub::open(&mut client, doomed.clone()).await.unwrap();
    let ack = publish(&mut client, event("abuse.del")).await;
    assert_eq!(member.next().await.sequence, ack.sequence);
    member
        .nack(&[ack.sequence], std::time::Duration::ZERO, "no")
        .await;
    dead_letters_eventually(&client, "abuse.doomed").await;
    let delete = |client: &mut pb::mesh_client::MeshClient<tonic::transport::Channel>| {
        let mut client = client.clone();
        async move {
            client
                .delete_group(pb::DeleteGroupRequest {
                    group: "abuse.doomed".into(),
                })
                .await
                .map(tonic::Response::into_inner)
        }
    };
    refused(
        delete(&mut client).await,
        Code::FailedPrecondition,
        "live member",
    );
    drop(member);
    let deleted = eventually("the member has left and the group is deleted", || {
        let mut client = client.clone();
        async move { delete(&mut client).await.ok() }
    })
    .await;
    assert_eq!(deleted.dead_letters, 1);
    refused(delete(&mut client).await, Code::NotFound, "abuse.doomed");
    let again = Sub::open(&mut client, doomed).await.unwrap();
    assert!(again.subscribed.created, "the name starts afresh");
    drop(again);

    for i in 0..150 {
        let mut g = open(&["abuse.page"]);
        g.group = format!("abuse.page{i:03}");
        drop(Sub::open(&mut client, g).await.unwrap());
    }
    let mut names = Vec::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_groups(pb::ListGroupsRequest {
                after_group: names.last().cloned().unwrap_or_default(),
                limit: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.groups.len() <= 100);
        pages += 1;
        names.extend(page.groups.into_iter().map(|g| g.name));
        if !page.more {
            break;
        }
    }
    assert!(pages >= 2);
    assert_eq!(names.len(), 151, "{names:?}");
    assert!(names.windows(2).all(|w| w[0] < w[1]));
}

/// Item 8: an event nacked with a long delay holds back its own aggregate only;
/// the group reads on past its 65,536-sequence window, and the delay survives a
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_nack_holds_only_its_aggregate() {
    let node = TestNode::start(Backend::Sqlite).await;
    let mut client = node.client().await;
    let mut member = open(&["abuse.park"]);
    member.group = "abuse.park".into();
    member.max_in_flight = 10_000;
    let mut sub = Sub::open(&mut client, member.clone()).await.unwrap();
    let held = |id: &str| {
        let mut e = event_with_id("abuse.park", id);
        e.aggregate_id = "held".into();
        e
    };
    let first = publish(&mut client, held("held-1")).await;
    assert_eq!(sub.next().await.sequence, first.sequence);
    sub.nack(
        &[first.sequence],
        std::time::Duration::from_secs(3600),
        "later",
    )
    .await;
    let second = publish(&mut client, held("held-2")).await;
    let others = 70_000;
    for chunk in 0..others / 10_000 {
        let events = (0..10_000)
            .map(|i| event_with_id("abuse.park", &format!("o-{chunk}-{i}")))
            .collect();
        publish_stream(&mut client, events).await;
    }
    let mut seen = 0;
    while seen < others {
        let d = sub.next().await;
        assert_ne!(
            d.sequence, second.sequence,
            "the held aggregate went out of order"
        );
        assert_ne!(d.sequence, first.sequence, "the delay was not kept");
        sub.ack(&[d.sequence]).await;
        seen += 1;
    }
    let info = eventually("the group settles all but the held aggregate", || {
        let mut client = client.clone();
        async move {
            let info = group_info(&mut client, "abuse.park").await;
            (info.lag == 2 && info.ack_floor > 70_000).then_some(info)
        }
    })
    .await;
    assert_eq!(info.pending, 1, "{info:?}");
    drop(sub);
    let node = node.restart().await;
    let mut client = node.client().await;
    let info = group_info(&mut client, "abuse.park").await;
    assert_eq!((info.lag, info.pending), (2, 1), "{info:?}");
    let mut sub = Sub::open(&mut client, member).await.unwrap();
    assert!(
        sub.try_next(std::time::Duration::from_millis(500))
            .await
            .is_none(),
        "the parked event and its aggregate stay held across a restart"
    );
}

/// Item 8: when its delay is over, a parked event comes back (attempt 2) before
/// the events of its aggregate that waited behind it, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_event_comes_back_first() {
    let node = TestNode::start(Backend::Sqlite).await;
    let mut client = node.client().await;
    let mut member = open(&["abuse.back"]);
    member.group = "abuse.back".into();
    let mut sub = Sub::open(&mut client, member).await.unwrap();
    let mut held = Vec::new();
    for i in 0..3 {
        let mut e = event_with_id("abuse.back", &format!("held-{i}"));
        e.aggregate_id = "held".into();
        held.push(publish(&mut client, e).await.sequence);
    }
    let first = sub.next().await;
    assert_eq!((first.sequence, first.attempt), (held[0], 1));
    sub.nack(&[held[0]], std::time::Duration::from_millis(300), "soon")
        .await;
    let other = publish(&mut client, event_with_id("abuse.back", "other")).await;
    assert_eq!(sub.next().await.sequence, other.sequence, "others go on");
    sub.ack(&[other.sequence]).await;
    let again = sub.next().await;
    assert_eq!((again.sequence, again.attempt), (held[0], 2));
    sub.ack(&[again.sequence]).await;
    for &seq in &held[1..] {
        let d = sub.next().await;
        assert_eq!((d.sequence, d.attempt), (seq, 1));
        sub.ack(&[seq]).await;
    }
    eventually("the group settles", || {
        let mut client = client.clone();
        async move {
            let info = group_info(&mut client, "abuse.back").await;
            (info.lag == 0 && info.pending == 0 && info.ack_floor == other.sequence).then_some(())
        }
    })
    .await;
}

/// Item 18: the node advertises a small stream window and the largest connection
/// window, so that h2's budget for unread small DATA frames (half the connection
/// window) covers every stream's window of them, and a fast publisher of small
/// messages never has its connection closed with `too_many_data_frames`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_control_windows_cover_small_frames() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = TestNode::start(Backend::Sqlite).await;
    let limits = node.config.connections.clone();
    let mut tcp = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let mut stream_window = None;
    let mut connection_increment = None;
    let read = async {
        while stream_window.is_none() || connection_increment.is_none() {
            let mut header = [0u8; 9];
            tcp.read_exact(&mut header).await.unwrap();
            let len = (usize::from(header[0]) << 16)
                | (usize::from(header[1]) << 8)
                | usize::from(header[2]);
            let mut payload = vec![0u8; len];
            tcp.read_exact(&mut payload).await.unwrap();
            let stream =
                u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
            match header[3] {
                // SETTINGS, not an ack: INITIAL_WINDOW_SIZE is setting 4.
                4 if header[4] & 1 == 0 => {
                    for setting in payload.chunks(6) {
                        if u16::from_be_bytes([setting[0], setting[1]]) == 4 {
                            stream_window = Some(u32::from_be_bytes([
                                setting[2], setting[3], setting[4], setting[5],
                            ]));
                        }
                    }
                }
                // WINDOW_UPDATE on the connection.
                8 if stream == 0 => {
                    connection_increment = Some(
                        u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                            & 0x7fff_ffff,
                    );
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("the node's SETTINGS and WINDOW_UPDATE");
    assert_eq!(stream_window, Some(limits.stream_window));
    let connection_window = 65_535 + u64::from(connection_increment.unwrap());
    assert_eq!(connection_window, u64::from(limits.connection_window));
    // h2 closes a connection when its unread small frames cost more than half the
    // connection window; a frame of 50 bytes costs 206. Every stream's window full
    // of them must fit.
    let worst =
        u64::from(limits.max_streams_per_connection) * u64::from(limits.stream_window) / 50 * 206;
    assert!(
        worst <= connection_window / 2,
        "{worst} > {}",
        connection_window / 2
    );
}
