//! Traces: `publish {type}` spans (PRODUCER) inject `traceparent` into the event's
//! headers, and `process {type}` spans (CONSUMER) continue it, so that one workflow
//! is one trace. A new workflow's correlation id is its trace id: searching Jaeger
//! for the correlation id finds the whole tree.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("a global tracing subscriber is already set: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// Keeps the exporter running; dropping it flushes and stops it.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports every finished span now. A collector that does not answer was
    /// already reported, once, by the exporter.
    pub fn flush(&self) {
        if let Err(e) = self.provider.force_flush() {
            tracing::debug!(error = %e, "flushing spans");
        }
    }
}

/// The OTLP exporter, reporting a collector that does not answer once: tracing is
/// optional, so a service without a collector warns when its first export fails and
/// then runs on quietly (the spans are dropped), until an export succeeds again.
#[derive(Debug)]
struct WarnOnce<E> {
    inner: E,
    endpoint: String,
    failing: AtomicBool,
}

impl<E: SpanExporter> SpanExporter for WarnOnce<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        match &result {
            Err(e) if !self.failing.swap(true, Ordering::Relaxed) => tracing::warn!(
                endpoint = %self.endpoint,
                error = %e,
                "cannot export spans; they are dropped until a collector answers there \
                 (tracing is optional: OTEL_EXPORTER_OTLP_ENDPOINT names the collector)"
            ),
            Ok(()) if self.failing.swap(false, Ordering::Relaxed) => {
                tracing::info!(endpoint = %self.endpoint, "exporting spans again");
            }
            _ => {}
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// Where spans go: what `init_with` was given, else what the standard variables say.
fn endpoint_of(given: Option<&str>) -> String {
    given
        .map(str::to_owned)
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").ok())
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .unwrap_or_else(|| "http://localhost:4317".to_owned())
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Sets up `tracing` with logs to stderr (filtered by `RUST_LOG`, default info) and
/// spans exported over OTLP/gRPC, configured by the standard `OTEL_*` variables
/// (`OTEL_EXPORTER_OTLP_ENDPOINT`, default `http://localhost:4317`;
/// `OTEL_SERVICE_NAME` overrides `service_name`). Call it inside a Tokio runtime,
/// once per process.
pub fn init(service_name: &str) -> Result<Telemetry, TelemetryError> {
    init_with(service_name, None, false)
}

/// Like [`init`], exporting to `endpoint` when given instead of the one the
/// environment names, with logs as JSON lines when `json_logs`.
pub fn init_with(
    service_name: &str,
    endpoint: Option<&str>,
    json_logs: bool,
) -> Result<Telemetry, TelemetryError> {
    use opentelemetry_otlp::WithExportConfig;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(endpoint) = endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    let exporter = WarnOnce {
        inner: builder.build()?,
        endpoint: endpoint_of(endpoint),
        failing: AtomicBool::new(false),
    };
    let service_name =
        std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service_name.to_owned());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name)
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("evmesh-client");
    opentelemetry::global::set_tracer_provider(provider.clone());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let logs = if json_logs {
        logs.json().boxed()
    } else {
        logs.boxed()
    };
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .with(logs.with_filter(filter))
        .try_init()?;
    Ok(Telemetry { provider })
}

struct Headers<'a>(&'a mut HashMap<String, String>);

impl Injector for Headers<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct ReadHeaders<'a>(&'a HashMap<String, String>);

impl Extractor for ReadHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Writes the span's context into the headers as `traceparent` (and `tracestate`).
pub(crate) fn inject(span: &tracing::Span, headers: &mut HashMap<String, String>) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut Headers(headers));
}

/// The span's trace id as 32 hex digits, when it has one.
pub(crate) fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| format!("{:032x}", sc.trace_id()))
}

/// Makes `span` continue the trace in `headers`, and link to the event's span.
pub(crate) fn continue_from(span: &tracing::Span, headers: &HashMap<String, String>) {
    let parent = TraceContextPropagator::new().extract(&ReadHeaders(headers));
    let remote = parent.span().span_context().clone();
    if remote.is_valid() {
        let _ = span.set_parent(parent);
        span.add_link(remote);
    }
}

/// A `publish {type}` span (PRODUCER), with OpenTelemetry's messaging attributes;
/// the id and conversation id are recorded once the envelope is built.
pub(crate) fn publish_span(event_type: &str) -> tracing::Span {
    tracing::info_span!(
        "publish",
        "otel.name" = format!("publish {event_type}"),
        "otel.kind" = "producer",
        "messaging.system" = "evmesh",
        "messaging.operation.type" = "send",
        "messaging.destination.name" = event_type,
        "messaging.message.id" = tracing::field::Empty,
        "messaging.message.conversation_id" = tracing::field::Empty,
    )
}

/// A `process {type}` span (CONSUMER) for one delivery, continuing its trace.
pub(crate) fn process_span(
    event: &evmesh_proto::v1::Event,
    group: &str,
    attempt: u32,
) -> tracing::Span {
    let span = tracing::info_span!(
        "process",
        "otel.name" = format!("process {}", event.r#type),
        "otel.kind" = "consumer",
        "messaging.system" = "evmesh",
        "messaging.operation.type" = "process",
        "messaging.destination.name" = %event.r#type,
        "messaging.message.id" = %event.id,
        "messaging.message.conversation_id" = %event.correlation_id,
        "messaging.consumer.group.name" = group,
        "messaging.delivery.attempt" = attempt,
    );
    continue_from(&span, &event.headers);
    span
}
