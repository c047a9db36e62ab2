//! The shop's workflow in Jaeger's terms: one trace whose id is the order's
//! correlation id, with edges order → payment → inventory → shipping. Spans go to an
//! OTLP receiver in the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use evmesh_client::Mesh;
use evmesh_shop::events::{LineItem, OrderPlaced};
use evmesh_tests::{Backend, OtlpCollector, TestNode, eventually, hex, span_attribute};
use opentelemetry_proto::tonic::trace::v1::Span;

fn find<'a>(spans: &'a [Span], name: &str, group: Option<&str>) -> Option<&'a Span> {
    spans.iter().find(|s| {
        s.name == name
            && group.is_none_or(|g| {
                span_attribute(s, "messaging.consumer.group.name").as_deref() == Some(g)
            })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workflow_is_one_trace_from_order_to_shipping() {
    let collector = OtlpCollector::start().await;
    let telemetry =
        evmesh_client::telemetry::init_with("shop", Some(&collector.endpoint()), false).unwrap();
    let node = TestNode::start_traced(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::connect(&node.url()).await.unwrap();
    evmesh_shop::register_all(&mesh).await.unwrap();
    let shop = evmesh_shop::start_all(&mesh, dir.path()).await.unwrap();
    let order = OrderPlaced {
        order_id: "o-trace".into(),
        customer: "ada".into(),
        total_cents: 990,
        items: vec![LineItem {
            sku: "pen".into(),
            quantity: 3,
        }],
    };
    let ack = evmesh_shop::place_order(&mesh, order).await.unwrap();

    let chain = [
        ("publish shop.order.placed", None),
        ("process shop.order.placed", Some("payment")),
        ("publish shop.payment.succeeded", None),
        ("process shop.payment.succeeded", Some("inventory")),
        ("publish shop.inventory.reserved", None),
        ("process shop.inventory.reserved", Some("shipping")),
        ("publish shop.shipment.scheduled", None),
    ];
    let spans = eventually("the whole workflow's spans", || {
        telemetry.flush();
        let collector = collector.clone();
        async move {
            let spans = collector.spans();
            chain
                .iter()
                .all(|(name, group)| find(&spans, name, *group).is_some())
                .then_some(spans)
        }
    })
    .await;
    let ordered: Vec<&Span> = chain
        .iter()
        .map(|(name, group)| find(&spans, name, *group).unwrap())
        .collect();
    for s in &ordered {
        assert_eq!(
            hex(&s.trace_id),
            ack.correlation_id,
            "{} is in the order's trace",
            s.name
        );
    }
    for pair in ordered.windows(2) {
        assert_eq!(
            pair[1].parent_span_id, pair[0].span_id,
            "{} is a child of {}",
            pair[1].name, pair[0].name
        );
    }
    assert!(
        ordered[0].parent_span_id.is_empty(),
        "the order's publish span is the root"
    );
    for c in shop.consumers {
        c.stop().await.unwrap();
    }
}
