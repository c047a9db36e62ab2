//! One workflow is one trace: an OTLP receiver in the test (a tonic server for the
//! collector's trace service) collects the spans of order → payment → inventory, and
//! the trace id is the correlation id, with parent and child edges along the
//! choreography and OpenTelemetry's messaging attributes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use evmesh_client::{Context, Mesh, Meta};
use evmesh_tests::shop::{OrderPlaced, PaymentSucceeded};
use evmesh_tests::*;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

fn attribute(span: &Span, key: &str) -> Option<String> {
    span_attribute(span, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_workflow_is_one_trace_keyed_by_its_correlation_id() {
    let collector = OtlpCollector::start().await;
    let endpoint = collector.endpoint();
    let telemetry =
        evmesh_client::telemetry::init_with("shop-test", Some(&endpoint), false).unwrap();

    let node = TestNode::start_traced(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::connect(&node.url()).await.unwrap();
    mesh.register::<OrderPlaced>().await.unwrap();
    mesh.register::<PaymentSucceeded>().await.unwrap();
    let payment = payment_service(&mesh, payment_db(&dir.path().join("payment.db")).await).await;
    let (shipped_tx, mut shipped) = tokio::sync::mpsc::channel(1);
    let inventory = mesh
        .consumer("inventory")
        .database(payment_db(&dir.path().join("inventory.db")).await)
        .on(move |ctx: Context, _paid: PaymentSucceeded| {
            let shipped_tx = shipped_tx.clone();
            async move {
                let _ = shipped_tx.send(ctx.event().correlation_id.clone()).await;
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();

    let ack = mesh
        .publish(
            &OrderPlaced {
                order_id: "o-t".into(),
                total_cents: 5,
            },
            Meta::default(),
        )
        .await
        .unwrap();
    let correlation = tokio::time::timeout(PATIENCE, shipped.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(correlation, ack.correlation_id);

    // The spans arrive once exported.
    let spans = eventually("four spans of the workflow", || {
        telemetry.flush();
        let collector = collector.clone();
        async move {
            let named: HashMap<String, Span> = collector
                .spans()
                .into_iter()
                .map(|s| (s.name.clone(), s))
                .collect();
            [
                "publish shop.order.placed",
                "append shop.order.placed",
                "process shop.order.placed",
                "publish shop.payment.succeeded",
                "process shop.payment.succeeded",
            ]
            .iter()
            .all(|n| named.contains_key(*n))
            .then_some(named)
        }
    })
    .await;
    let publish = &spans["publish shop.order.placed"];
    let process = &spans["process shop.order.placed"];
    let republish = &spans["publish shop.payment.succeeded"];
    let reprocess = &spans["process shop.payment.succeeded"];
    // The trace id is the correlation id, on every span.
    for s in [publish, process, republish, reprocess] {
        assert_eq!(hex(&s.trace_id), ack.correlation_id, "{}", s.name);
        assert_eq!(attribute(s, "messaging.system").as_deref(), Some("evmesh"));
        assert_eq!(
            attribute(s, "messaging.message.conversation_id").as_deref(),
            Some(ack.correlation_id.as_str())
        );
    }
    // order → payment → inventory, edge by edge.
    assert_eq!(publish.kind, SpanKind::Producer as i32);
    assert_eq!(process.kind, SpanKind::Consumer as i32);
    assert_eq!(process.parent_span_id, publish.span_id);
    assert_eq!(process.links.len(), 1, "a link to the causing event");
    assert_eq!(process.links[0].span_id, publish.span_id);
    assert_eq!(republish.parent_span_id, process.span_id);
    assert_eq!(reprocess.parent_span_id, republish.span_id);
    assert_eq!(
        attribute(process, "messaging.consumer.group.name").as_deref(),
        Some("payment")
    );
    assert_eq!(
        attribute(reprocess, "messaging.consumer.group.name").as_deref(),
        Some("inventory")
    );
    assert_eq!(
        attribute(publish, "messaging.message.id").as_deref(),
        Some(ack.event_id.as_str())
    );
    assert_eq!(
        attribute(publish, "messaging.destination.name").as_deref(),
        Some("shop.order.placed")
    );
    payment.stop().await.unwrap();
    inventory.stop().await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
}
