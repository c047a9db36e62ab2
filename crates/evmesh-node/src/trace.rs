//! The node's spans in the publishers' traces: an `append {type}` span per accepted
//! event, from validation to the durable commit, child of the publish span named by
//! the event's `traceparent`. Only when `NodeConfig::trace_events` is on: a span per
//! event costs, and it only pays when the spans are exported.

use std::collections::HashMap;

use evmesh_proto::v1::Event;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Headers<'a>(&'a HashMap<String, String>);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The span of one accepted event, or a disabled span when tracing is off.
pub(crate) fn append_span(event: &Event, enabled: bool) -> tracing::Span {
    if !enabled {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "append",
        "otel.name" = format!("append {}", event.r#type),
        "otel.kind" = "server",
        "messaging.system" = "evmesh",
        "messaging.operation.type" = "receive",
        "messaging.destination.name" = %event.r#type,
        "messaging.message.id" = %event.id,
        "messaging.message.conversation_id" = %event.correlation_id,
        "evmesh.sequence" = tracing::field::Empty,
    );
    let parent = TraceContextPropagator::new().extract(&Headers(&event.headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    span
}
