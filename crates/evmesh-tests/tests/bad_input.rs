//! Every bad input gets its own status, naming what was wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use evmesh_tests::v1 as pb;
use evmesh_tests::*;
use tonic::Code;

#[track_caller]
fn expect_status<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("must fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} does not name {needle:?}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_rejections_name_the_field() {
    let node = TestNode::start(Backend::Sqlite).await;
    let mut client = node.client().await;
    let with = |edit: &dyn Fn(&mut pb::Event)| {
        let mut e = event("shop.order.placed");
        edit(&mut e);
        pb::PublishRequest { event: Some(e) }
    };
    let cases: Vec<(pb::PublishRequest, Code, &str)> = vec![
        (
            pb::PublishRequest { event: None },
            Code::InvalidArgument,
            "event is required",
        ),
        (
            with(&|e| e.r#type = "Shop.Order".into()),
            Code::InvalidArgument,
            "event.type",
        ),
        (
            with(&|e| e.r#type = "shop.>".into()),
            Code::InvalidArgument,
            "event.type",
        ),
        (
            with(&|e| e.r#type = String::new()),
            Code::InvalidArgument,
            "event.type",
        ),
        (
            with(&|e| e.id = "i".repeat(200)),
            Code::InvalidArgument,
            "event.id",
        ),
        (
            with(&|e| e.id = "has space".into()),
            Code::InvalidArgument,
            "event.id",
        ),
        (
            with(&|e| e.schema_version = "v1".into()),
            Code::InvalidArgument,
            "event.schema_version",
        ),
        (
            with(&|e| e.aggregate_id = "a".repeat(300)),
            Code::InvalidArgument,
            "event.aggregate_id",
        ),
        (
            with(&|e| e.source = "s".repeat(300)),
            Code::InvalidArgument,
            "event.source",
        ),
        (
            with(&|e| e.correlation_id = "c".repeat(300)),
            Code::InvalidArgument,
            "event.correlation_id",
        ),
        (
            with(&|e| e.causation_id = "c".repeat(300)),
            Code::InvalidArgument,
            "event.causation_id",
        ),
        (
            with(&|e| e.headers = (0..100).map(|i| (format!("h{i}"), "v".into())).collect()),
            Code::ResourceExhausted,
            "event.headers",
        ),
        (
            with(&|e| {
                e.headers.insert("big".into(), "v".repeat(20_000));
            }),
            Code::ResourceExhausted,
            "event.headers",
        ),
        (
            with(&|e| e.payload = None),
            Code::InvalidArgument,
            "event.payload",
        ),
        (
            with(&|e| e.payload.as_mut().unwrap().type_url = "no-slash".into()),
            Code::InvalidArgument,
            "event.payload.type_url",
        ),
        (
            with(&|e| e.payload.as_mut().unwrap().value = vec![7; 2 * 1024 * 1024]),
            Code::ResourceExhausted,
            "event.payload",
        ),
    ];
    for (request, code, needle) in cases {
        expect_status(client.publish_event(request).await, code, needle);
    }
    // A message over the transport limit is refused by gRPC itself, not a crash.
    let huge = with(&|e| e.payload.as_mut().unwrap().value = vec![7; 8 * 1024 * 1024]);
    expect_status(
        client.publish_event(huge).await,
        Code::ResourceExhausted,
        "",
    );
    // The node is fine afterwards.
    publish(&mut client, event("shop.order.placed")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_rejections_name_the_field() {
    let node = TestNode::start(Backend::Sqlite).await;
    let mut client = node.client().await;
    let cases: Vec<(pb::SubscribeOpen, Code, &str)> = vec![
        (open(&[]), Code::InvalidArgument, "open.patterns"),
        (open(&["shop..x"]), Code::InvalidArgument, "open.patterns"),
        (open(&["shop.>.x"]), Code::InvalidArgument, "open.patterns"),
        (
            open(&["shop.>@not semver"]),
            Code::InvalidArgument,
            "open.patterns",
        ),
        (
            pb::SubscribeOpen {
                group: "Bad Group".into(),
                ..open(&["shop.>"])
            },
            Code::InvalidArgument,
            "open.group",
        ),
        (
            pb::SubscribeOpen {
                max_in_flight: 1_000_000,
                ..open(&["shop.>"])
            },
            Code::InvalidArgument,
            "open.max_in_flight",
        ),
        (
            pb::SubscribeOpen {
                ack_timeout: Some(prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                }),
                ..open(&["shop.>"])
            },
            Code::InvalidArgument,
            "open.ack_timeout",
        ),
        (
            pb::SubscribeOpen {
                ack_timeout: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 1000,
                }),
                ..open(&["shop.>"])
            },
            Code::InvalidArgument,
            "open.ack_timeout",
        ),
    ];
    for (o, code, needle) in cases {
        expect_status(
            Sub::open(&mut client, o).await.map(|s| s.subscribed),
            code,
            needle,
        );
    }
    // A first message that is not open.
    let requests = tokio_stream::iter(vec![pb::SubscribeRequest {
        request: Some(pb::subscribe_request::Request::Ack(pb::Ack {
            sequences: vec![1],
        })),
    }]);
    expect_status(
        client.subscribe(requests).await.map(|_| ()),
        Code::InvalidArgument,
        "open",
    );
    let empty = tokio_stream::iter(Vec::<pb::SubscribeRequest>::new());
    expect_status(
        client.subscribe(empty).await.map(|_| ()),
        Code::InvalidArgument,
        "open",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_rejections_name_the_field() {
    let node = TestNode::start(Backend::Sqlite).await;
    let mut client = node.client().await;
    expect_status(
        client.get_chain(pb::GetChainRequest::default()).await,
        Code::InvalidArgument,
        "correlation_id",
    );
    let earliest = Some(pb::StartPosition {
        position: Some(pb::start_position::Position::Earliest(())),
    });
    expect_status(
        client
            .seek_group(pb::SeekGroupRequest {
                group: "nobody".into(),
                position: earliest,
            })
            .await,
        Code::NotFound,
        "nobody",
    );
    expect_status(
        client
            .seek_group(pb::SeekGroupRequest {
                group: String::new(),
                position: earliest,
            })
            .await,
        Code::InvalidArgument,
        "group",
    );
    Sub::open(
        &mut client,
        pb::SubscribeOpen {
            group: "real".into(),
            ..open(&["shop.>"])
        },
    )
    .await
    .unwrap();
    expect_status(
        client
            .seek_group(pb::SeekGroupRequest {
                group: "real".into(),
                position: None,
            })
            .await,
        Code::InvalidArgument,
        "position",
    );
    expect_status(
        client
            .list_dead_letters(pb::ListDeadLettersRequest {
                group: "nobody".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "nobody",
    );
    expect_status(
        client
            .redrive_dead_letters(pb::RedriveDeadLettersRequest {
                group: "nobody".into(),
                sequences: vec![],
            })
            .await,
        Code::NotFound,
        "nobody",
    );
    expect_status(
        client
            .purge_dead_letters(pb::PurgeDeadLettersRequest {
                group: String::new(),
                sequences: vec![],
            })
            .await,
        Code::InvalidArgument,
        "group",
    );
}
