//! The JSON mapping of the node's gRPC services that the console speaks, on the
//! HTTP listener: `POST /api/{service}/{method}` with the request message as proto3
//! JSON answers the response message as proto3 JSON (field names as in the
//! `.proto`), and `POST /api/evmesh.v1.Mesh/Subscribe` streams a tail as one JSON
//! line per response.
//!
//! There is no second implementation of anything here: each call is encoded and
//! sent through the very services, auth layer and limits the gRPC listener serves,
//! in process, and the answer decoded. What the mapping adds is presentation:
//! payloads as JSON through their registered schema, and a schema's files as
//! `.proto` source.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use prost::Message;
use prost_reflect::{
    DescriptorPool, DynamicMessage, MessageDescriptor, MethodDescriptor, ReflectMessage,
    SerializeOptions, Value as Field,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tonic::{Code, Status};
use tower::ServiceExt;

use crate::catalog::Catalogs;

/// The node's gRPC services behind the layers every gRPC call passes.
pub(crate) type Grpc = tower::util::BoxCloneSyncService<
    http::Request<Body>,
    http::Response<tonic::body::Body>,
    Infallible,
>;

/// The services the mapping serves; health and reflection have their own clients.
const SERVICES: [&str; 2] = ["evmesh.v1.Mesh", "evmesh.v1.SchemaRegistry"];

/// Tail lines a browser may be behind before newer ones are dropped (and counted):
/// a slow browser never holds the subscription back.
const TAIL_BUFFER: usize = 1024;

/// Tails open at once through the JSON API, all browsers together; one more is
/// refused with RESOURCE_EXHAUSTED. (The HTTP listener has no connection cap of its
/// own, as the gRPC listener has.)
pub(crate) const MAX_TAILS: usize = 64;

/// A request body larger than this is refused; the console's requests are small.
pub(crate) const MAX_REQUEST_BYTES: usize = 1024 * 1024;

pub(crate) struct Gateway {
    grpc: Grpc,
    pool: DescriptorPool,
    catalogs: Arc<Catalogs>,
    /// One permit per open tail.
    tails: Arc<tokio::sync::Semaphore>,
}

impl Gateway {
    pub(crate) fn new(
        grpc: Grpc,
        catalogs: Arc<Catalogs>,
    ) -> Result<Self, prost_reflect::DescriptorError> {
        let pool = DescriptorPool::decode(evmesh_proto::FILE_DESCRIPTOR_SET)?;
        Ok(Self {
            grpc,
            pool,
            catalogs,
            tails: Arc::new(tokio::sync::Semaphore::new(MAX_TAILS)),
        })
    }

    fn method(&self, service: &str, method: &str) -> Result<MethodDescriptor, Failure> {
        if !SERVICES.contains(&service) {
            return Err(Failure::new(
                Code::NotFound,
                format!(
                    "no service {service} here: the JSON API serves {}",
                    SERVICES.join(" and ")
                ),
            ));
        }
        self.pool
            .get_service_by_name(service)
            .and_then(|s| s.methods().find(|m| m.name() == method))
            .ok_or_else(|| {
                Failure::new(Code::NotFound, format!("{service} has no method {method}"))
            })
    }

    /// Sends `request` to `method` through the gRPC services, with the caller's
    /// credentials.
    async fn call(
        &self,
        method: &MethodDescriptor,
        request: &DynamicMessage,
        headers: &HeaderMap,
    ) -> http::Response<tonic::body::Body> {
        let message = request.encode_to_vec();
        let mut framed = BytesMut::with_capacity(message.len() + 5);
        framed.extend_from_slice(&[0]);
        framed.extend_from_slice(
            &u32::try_from(message.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        framed.extend_from_slice(&message);
        let mut grpc = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!(
                "/{}/{}",
                method.parent_service().full_name(),
                method.name()
            ))
            .header(header::CONTENT_TYPE, "application/grpc")
            .header("te", "trailers");
        if let Some(authorization) = headers.get(header::AUTHORIZATION) {
            grpc = grpc.header(header::AUTHORIZATION, authorization);
        }
        let grpc = grpc
            .body(Body::from(framed.freeze()))
            .unwrap_or_else(|_| unreachable!("a request of valid parts"));
        match self.grpc.clone().oneshot(grpc).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }

    /// A response message as JSON, payloads through their schemas.
    fn to_json(&self, message: &DynamicMessage) -> Value {
        let mut stripped = message.clone();
        strip_payloads(&mut stripped);
        let options = SerializeOptions::new()
            .use_proto_field_name(true)
            .skip_default_fields(false);
        let mut value = stripped
            .serialize_with_options(serde_json::value::Serializer, &options)
            .unwrap_or_else(
                |e| json!({ "error": format!("the response does not map to JSON: {e}") }),
            );
        let catalog = self.catalogs.load();
        visit(
            message,
            &mut value,
            &mut |m, v| match m.descriptor().full_name() {
                "evmesh.v1.Event" => {
                    if let Some(object) = v.as_object_mut() {
                        object.insert("payload".to_owned(), payload_json(&catalog, m));
                    }
                    false
                }
                "evmesh.v1.Schema" => {
                    if let (Some(object), Some(files)) = (v.as_object_mut(), sources(m)) {
                        object.insert("files".to_owned(), files);
                    }
                    false
                }
                _ => true,
            },
        );
        value
    }
}

/// An answer that is not the method's response: a gRPC status, or the mapping's own
/// refusal, as `{"code": "NOT_FOUND", "message": "..."}` with a fitting HTTP status.
#[derive(Debug)]
pub(crate) struct Failure {
    code: Code,
    message: String,
}

impl Failure {
    fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn json(&self) -> Value {
        json!({ "code": crate::metrics::code_label(self.code), "message": self.message })
    }
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Self::new(status.code(), status.message())
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = match self.code {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        json_response(status, &self.json())
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// Refuses what a page on another site could send the node through the viewer's
/// browser: a request must be JSON (which no cross-site form can send without the
/// browser asking first, and the node never answers that question) and must not
/// come from another origin.
fn same_origin(headers: &HeaderMap) -> Result<(), Failure> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim() == "application/json")
        });
    if !json {
        return Err(Failure::new(
            Code::InvalidArgument,
            "the JSON API takes Content-Type: application/json",
        ));
    }
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v != "same-origin" && v != "none")
    {
        return Err(Failure::new(
            Code::PermissionDenied,
            "the JSON API answers the console's own pages only, not other sites'",
        ));
    }
    if let (Some(origin), Some(host)) = (headers.get(header::ORIGIN), headers.get(header::HOST)) {
        let origin = origin.to_str().unwrap_or_default();
        let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
        if origin_host.as_bytes() != host.as_bytes() {
            return Err(Failure::new(
                Code::PermissionDenied,
                format!("a request from {origin} is not from this node's console"),
            ));
        }
    }
    Ok(())
}

/// The request message from its JSON (an empty body: every field unset).
fn request_of(descriptor: MessageDescriptor, body: &[u8]) -> Result<DynamicMessage, Failure> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DynamicMessage::new(descriptor));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    DynamicMessage::deserialize(descriptor.clone(), &mut deserializer)
        .and_then(|m| deserializer.end().map(|()| m))
        .map_err(|e| {
            Failure::new(
                Code::InvalidArgument,
                format!(
                    "the request is not a {} in JSON: {e}",
                    descriptor.full_name()
                ),
            )
        })
}

/// The status a gRPC response ended with: in its headers when it had no message,
/// else in its trailers.
fn status_of(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Status {
    Status::from_header_map(headers)
        .or_else(|| trailers.and_then(Status::from_header_map))
        .unwrap_or_else(|| Status::internal("the service answered without a status"))
}

/// A status in a response's headers: the call ended before any message (a
/// trailers-only response), refused when it is not OK.
fn refused_at_once(headers: &HeaderMap) -> Result<(), Failure> {
    match Status::from_header_map(headers) {
        Some(status) if status.code() != Code::Ok => Err(status.into()),
        _ => Ok(()),
    }
}

/// The next whole gRPC message in `buffer`, taken out of it.
fn next_message(buffer: &mut BytesMut) -> Result<Option<Bytes>, Failure> {
    if buffer.len() < 5 {
        return Ok(None);
    }
    if buffer[0] != 0 {
        return Err(Failure::new(
            Code::Internal,
            "the service answered a compressed message",
        ));
    }
    let length = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
    if buffer.len() < 5 + length {
        return Ok(None);
    }
    buffer.advance(5);
    Ok(Some(buffer.split_to(length).freeze()))
}

/// `POST /api/{service}/{method}`: one request, one response.
pub(crate) async fn unary(
    State(gateway): State<Arc<Gateway>>,
    Path((service, method)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Failure> {
    same_origin(&headers)?;
    let method = gateway.method(&service, &method)?;
    if method.is_client_streaming() || method.is_server_streaming() {
        return Err(Failure::new(
            Code::Unimplemented,
            format!(
                "{service}/{} streams: the JSON API maps the unary methods, and Subscribe as a tail",
                method.name()
            ),
        ));
    }
    let request = request_of(method.input(), &body)?;
    let (parts, body) = gateway.call(&method, &request, &headers).await.into_parts();
    refused_at_once(&parts.headers)?;
    let collected = body
        .collect()
        .await
        .map_err(|status| Failure::new(status.code(), status.message()))?;
    let status = status_of(&parts.headers, collected.trailers());
    if status.code() != Code::Ok {
        return Err(status.into());
    }
    let mut data = BytesMut::from(collected.to_bytes());
    let bytes = next_message(&mut data)?
        .ok_or_else(|| Failure::new(Code::Internal, "the service answered no message"))?;
    let response = DynamicMessage::decode(method.output(), bytes).map_err(|e| {
        Failure::new(
            Code::Internal,
            format!("the service's answer does not decode: {e}"),
        )
    })?;
    Ok(json_response(StatusCode::OK, &gateway.to_json(&response)))
}

/// `POST /api/evmesh.v1.Mesh/Subscribe` with `{"open": {...}}`: an ephemeral,
/// auto-acked subscription (a tail), answered as one JSON line per response while
/// the browser reads. Lines a browser is too slow for are dropped and counted in a
/// `{"dropped": N}` line (N in all so far) rather than held back; a status that
/// ends the subscription comes last, as `{"error": {...}}`.
pub(crate) async fn tail(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Failure> {
    same_origin(&headers)?;
    let method = gateway.method("evmesh.v1.Mesh", "Subscribe")?;
    let request = request_of(method.input(), &body)?;
    let open = match request.get_field_by_name("open").as_deref() {
        Some(Field::Message(open)) if request.has_field_by_name("open") => open.clone(),
        _ => {
            return Err(Failure::new(
                Code::InvalidArgument,
                "open is required: {\"open\": {\"patterns\": [...], \"auto_ack\": true}}",
            ));
        }
    };
    let text = |name: &str| {
        open.get_field_by_name(name)
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    if !text("group").is_empty() {
        return Err(Failure::new(
            Code::InvalidArgument,
            "open.group must be empty: the JSON API tails with ephemeral subscriptions, not as a group member",
        ));
    }
    if open.get_field_by_name("auto_ack").and_then(|v| v.as_bool()) != Some(true) {
        return Err(Failure::new(
            Code::InvalidArgument,
            "open.auto_ack must be true: a tail never acks",
        ));
    }
    let permit = gateway.tails.clone().try_acquire_owned().map_err(|_| {
        Failure::new(
            Code::ResourceExhausted,
            format!("{MAX_TAILS} tails are open through the console already: close one first"),
        )
    })?;
    let (parts, body) = gateway.call(&method, &request, &headers).await.into_parts();
    refused_at_once(&parts.headers)?;
    let (lines, read) = mpsc::channel::<Bytes>(TAIL_BUFFER);
    let output = method.output();
    tokio::spawn(async move {
        forward(gateway, output, parts.headers, body, lines).await;
        drop(permit);
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(read).map(Ok::<_, Infallible>);
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

use tokio_stream::StreamExt as _;

fn line(value: &Value) -> Bytes {
    let mut text = value.to_string();
    text.push('\n');
    Bytes::from(text)
}

/// Moves a tail's responses to the browser's lines until either side ends.
async fn forward(
    gateway: Arc<Gateway>,
    output: MessageDescriptor,
    headers: HeaderMap,
    mut body: tonic::body::Body,
    lines: mpsc::Sender<Bytes>,
) {
    let mut buffer = BytesMut::new();
    let (mut dropped, mut reported) = (0u64, 0u64);
    let end = loop {
        let frame = tokio::select! {
            () = lines.closed() => return,
            frame = body.frame() => frame,
        };
        match frame {
            None => break status_of(&headers, None),
            Some(Err(status)) => break status,
            Some(Ok(frame)) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        buffer.extend_from_slice(&data);
                        None
                    }
                    Err(frame) => frame.into_trailers().ok(),
                };
                if let Some(trailers) = frame {
                    break status_of(&headers, Some(&trailers));
                }
            }
        }
        loop {
            let message = match next_message(&mut buffer) {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(failure) => {
                    let _ = lines.try_send(line(&json!({ "error": failure.json() })));
                    return;
                }
            };
            let json = match DynamicMessage::decode(output.clone(), message) {
                Ok(m) => gateway.to_json(&m),
                Err(e) => {
                    json!({ "error": { "code": "INTERNAL", "message": format!("a delivery does not decode: {e}") } })
                }
            };
            if dropped > reported {
                match lines.try_send(line(&json!({ "dropped": dropped }))) {
                    Ok(()) => reported = dropped,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        dropped += 1;
                        continue;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
            match lines.try_send(line(&json)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => dropped += 1,
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    };
    // The end is worth waiting for: the browser shows why the tail stopped.
    let failure = Failure::from(end);
    let _ = lines.send(line(&json!({ "error": failure.json() }))).await;
}

/// Clears the payload of every event in `message`: serialising an `Any` needs its
/// type in the envelope's pool, and payload types live in the registry's.
fn strip_payloads(message: &mut DynamicMessage) {
    if message.descriptor().full_name() == "evmesh.v1.Event" {
        message.clear_field_by_name("payload");
        return;
    }
    for (_, value) in message.fields_mut() {
        match value {
            Field::Message(m) => strip_payloads(m),
            Field::List(items) => {
                for item in items {
                    if let Field::Message(m) = item {
                        strip_payloads(m);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Walks the messages in `message` beside their JSON in `value`; `f` says whether to
/// go on into a message's fields.
fn visit(
    message: &DynamicMessage,
    value: &mut Value,
    f: &mut dyn FnMut(&DynamicMessage, &mut Value) -> bool,
) {
    if !f(message, value) {
        return;
    }
    for (field, field_value) in message.fields() {
        let Some(json) = value.get_mut(field.name()) else {
            continue;
        };
        match field_value {
            Field::Message(m) => visit(m, json, f),
            Field::List(items) => {
                for (item, json) in items.iter().zip(json.as_array_mut().into_iter().flatten()) {
                    if let Field::Message(m) = item {
                        visit(m, json, f);
                    }
                }
            }
            _ => {}
        }
    }
}

/// An event's payload as proto3 JSON through its registered schema, with its
/// `@type`; when it has none (or does not decode), its bytes in base64 with
/// `@error` saying why.
fn payload_json(catalog: &crate::catalog::Catalog, event: &DynamicMessage) -> Value {
    let text = |name: &str| {
        event
            .get_field_by_name(name)
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    let Some(Field::Message(any)) = event.get_field_by_name("payload").as_deref().cloned() else {
        return Value::Null;
    };
    if !event.has_field_by_name("payload") {
        return Value::Null;
    }
    let type_url = any
        .get_field_by_name("type_url")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let bytes = any
        .get_field_by_name("value")
        .and_then(|v| v.as_bytes().cloned())
        .unwrap_or_default();
    let (ty, version) = (text("type"), text("schema_version"));
    let decoded = (|| {
        let version = if version.is_empty() {
            None
        } else {
            Some(
                evmesh_schema::parse_version(&version)
                    .map_err(|e| format!("schema_version {e}"))?,
            )
        };
        let (version, entry) = catalog.resolve(&ty, version.as_ref()).ok_or_else(|| {
            format!(
                "no schema is registered for {ty} {}",
                text("schema_version")
            )
        })?;
        let schema = catalog
            .schema(&ty, version, entry)
            .map_err(|e| format!("version {version} of {ty} does not compile: {e}"))?;
        let message =
            DynamicMessage::decode(schema.message().clone(), bytes.as_ref()).map_err(|e| {
                format!(
                    "the payload does not decode as {}: {e}",
                    schema.message_name()
                )
            })?;
        let options = SerializeOptions::new().use_proto_field_name(true);
        message
            .serialize_with_options(serde_json::value::Serializer, &options)
            .map_err(|e| format!("the payload does not map to JSON: {e}"))
    })();
    let mut object = serde_json::Map::new();
    object.insert("@type".to_owned(), Value::String(type_url));
    match decoded {
        Ok(Value::Object(fields)) => object.extend(fields),
        Ok(other) => {
            object.insert("value".to_owned(), other);
        }
        Err(reason) => {
            use base64::Engine as _;
            object.insert(
                "@value".to_owned(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(&bytes)),
            );
            object.insert("@error".to_owned(), Value::String(reason));
        }
    }
    Value::Object(object)
}

/// A schema's files as `.proto` source, the payload message's file first.
fn sources(schema: &DynamicMessage) -> Option<Value> {
    let set = schema.get_field_by_name("descriptor_set")?;
    let bytes = set.as_bytes()?;
    if bytes.is_empty() {
        return None;
    }
    let pool = DescriptorPool::decode(bytes.as_ref()).ok()?;
    let message_name = schema
        .get_field_by_name("message_name")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let own = pool
        .get_message_by_name(&message_name)
        .map(|m| m.parent_file().name().to_owned());
    let mut files: Vec<_> = pool.files().collect();
    files.sort_by_key(|f| (Some(f.name()) != own.as_deref(), f.name().to_owned()));
    Some(Value::Array(
        files
            .iter()
            .map(|f| json!({ "name": f.name(), "source": evmesh_schema::proto_source(f) }))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_taken_whole_from_the_stream() {
        let mut buffer = BytesMut::from(&[0u8, 0, 0, 0, 3, 1, 2][..]);
        assert!(next_message(&mut buffer).unwrap().is_none());
        buffer.extend_from_slice(&[3, 0, 0, 0, 0, 0]);
        assert_eq!(
            next_message(&mut buffer).unwrap().unwrap().as_ref(),
            &[1, 2, 3]
        );
        assert_eq!(
            next_message(&mut buffer).unwrap().unwrap().as_ref(),
            &[] as &[u8]
        );
        assert!(next_message(&mut buffer).unwrap().is_none());
        let mut compressed = BytesMut::from(&[1u8, 0, 0, 0, 0][..]);
        assert!(next_message(&mut compressed).is_err());
    }

    #[test]
    fn cross_site_requests_are_refused() {
        let mut headers = HeaderMap::new();
        assert!(same_origin(&headers).is_err(), "no content type");
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(same_origin(&headers).is_err(), "a form's content type");
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert!(same_origin(&headers).is_ok());
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:50080"));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:50080"),
        );
        assert!(same_origin(&headers).is_ok());
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(same_origin(&headers).is_err(), "another origin");
        headers.remove(header::ORIGIN);
        headers.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(same_origin(&headers).is_err(), "a cross-site fetch");
    }
}
