//! Checks an incoming envelope against the node's limits and fills what the node
//! owns: id, occurred_at and correlation_id.

use std::time::SystemTime;

use evmesh_proto::v1::{Event, PublishRejection, Violation};
use evmesh_schema::quoted;
use tonic::Code;

/// `google.protobuf.Timestamp`'s range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
const MIN_TIMESTAMP: i64 = -62_135_596_800;
const MAX_TIMESTAMP: i64 = 253_402_300_799;

/// What a publish may carry. Over a limit is RESOURCE_EXHAUSTED (sizes, counts) or
/// INVALID_ARGUMENT (lengths of identifiers).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Bytes of `payload.value`.
    pub max_payload_bytes: usize,
    pub max_headers: usize,
    /// Bytes of all header keys and values together.
    pub max_header_bytes: usize,
    pub max_id_len: usize,
    /// Bytes of source, aggregate_id, correlation_id and causation_id each.
    pub max_field_len: usize,
    /// Bytes of `payload.type_url`.
    pub max_type_url_len: usize,
}

impl Limits {
    /// The most an accepted envelope can hold besides its payload: with the payload,
    /// what a delivery of any stored event must have room for.
    pub fn max_envelope_overhead(&self) -> usize {
        // Each field's bytes, plus the framing of every header entry (tags and
        // lengths) and of the rest, generously.
        self.max_header_bytes
            + 16 * self.max_headers
            + self.max_id_len
            + evmesh_store::MAX_TYPE_LEN
            + evmesh_schema::MAX_VERSION_LEN
            + 4 * self.max_field_len
            + self.max_type_url_len
            + 1024
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1024 * 1024,
            max_headers: 64,
            max_header_bytes: 16 * 1024,
            max_id_len: 128,
            max_field_len: 256,
            max_type_url_len: 1024,
        }
    }
}

/// Why one event was not accepted: every violation found, and the status code of
/// the first.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub code: Code,
    pub violations: Vec<Violation>,
    pub event_id: String,
}

impl Rejection {
    pub fn message(&self) -> String {
        self.violations
            .iter()
            .map(|v| v.message.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::new(self.code, self.message())
    }

    pub fn into_proto(self) -> PublishRejection {
        PublishRejection {
            code: self.code as i32,
            message: self.message(),
            violations: self.violations,
            event_id: self.event_id,
        }
    }
}

struct Found {
    code: Option<Code>,
    violations: Vec<Violation>,
}

impl Found {
    fn add(&mut self, code: Code, rule: &str, path: &str, message: String) {
        self.code.get_or_insert(code);
        self.violations.push(Violation {
            rule: rule.to_owned(),
            path: path.to_owned(),
            message,
        });
    }
}

fn is_printable_id(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic())
}

/// Validates `event` and fills the node-owned fields. Returns every violation.
pub fn accept(event: Option<Event>, limits: &Limits) -> Result<Event, Rejection> {
    let Some(mut event) = event else {
        return Err(Rejection {
            code: Code::InvalidArgument,
            violations: vec![Violation {
                rule: "EVENT_REQUIRED".into(),
                path: "event".into(),
                message: "event is required".into(),
            }],
            event_id: String::new(),
        });
    };
    let mut found = Found {
        code: None,
        violations: Vec::new(),
    };
    if event.id.len() > limits.max_id_len {
        found.add(
            Code::InvalidArgument,
            "ID_LENGTH",
            "event.id",
            format!(
                "event.id is {} bytes long, at most {} allowed",
                event.id.len(),
                limits.max_id_len
            ),
        );
    } else if !is_printable_id(&event.id) {
        found.add(
            Code::InvalidArgument,
            "ID_SYNTAX",
            "event.id",
            "event.id may hold only printable ASCII without spaces".into(),
        );
    }
    if let Err(e) = evmesh_store::validate_event_type(&event.r#type) {
        found.add(
            Code::InvalidArgument,
            "TYPE_SYNTAX",
            "event.type",
            format!(
                "event.type {} {e}: use dotted lowercase tokens such as shop.order.placed",
                quoted(&event.r#type)
            ),
        );
    }
    if !event.schema_version.is_empty()
        && let Err(e) = evmesh_schema::parse_version(&event.schema_version)
    {
        found.add(
            Code::InvalidArgument,
            "SCHEMA_VERSION_SYNTAX",
            "event.schema_version",
            format!("event.schema_version {e}"),
        );
    }
    if event.occurred_at.as_ref().is_some_and(|at| {
        !(MIN_TIMESTAMP..=MAX_TIMESTAMP).contains(&at.seconds)
            || !(0..1_000_000_000).contains(&at.nanos)
    }) {
        found.add(
            Code::InvalidArgument,
            "OCCURRED_AT_RANGE",
            "event.occurred_at",
            "event.occurred_at must lie within years 0001 to 9999, with nanos from 0 to 999999999"
                .into(),
        );
    }
    for (path, value) in [
        ("event.source", &event.source),
        ("event.aggregate_id", &event.aggregate_id),
        ("event.correlation_id", &event.correlation_id),
        ("event.causation_id", &event.causation_id),
    ] {
        if value.len() > limits.max_field_len {
            found.add(
                Code::InvalidArgument,
                "FIELD_LENGTH",
                path,
                format!(
                    "{path} is {} bytes long, at most {} allowed",
                    value.len(),
                    limits.max_field_len
                ),
            );
        }
    }
    if event.headers.len() > limits.max_headers {
        found.add(
            Code::ResourceExhausted,
            "HEADER_COUNT",
            "event.headers",
            format!(
                "event.headers has {} entries, at most {} allowed",
                event.headers.len(),
                limits.max_headers
            ),
        );
    }
    let header_bytes: usize = event.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    if header_bytes > limits.max_header_bytes {
        found.add(
            Code::ResourceExhausted,
            "HEADER_SIZE",
            "event.headers",
            format!(
                "event.headers hold {header_bytes} bytes, at most {} allowed",
                limits.max_header_bytes
            ),
        );
    }
    if event.headers.keys().any(String::is_empty) {
        found.add(
            Code::InvalidArgument,
            "HEADER_KEY",
            "event.headers",
            "event.headers has an empty key".into(),
        );
    }
    match &event.payload {
        None => found.add(
            Code::InvalidArgument,
            "PAYLOAD_REQUIRED",
            "event.payload",
            "event.payload is required".into(),
        ),
        Some(payload) if payload.type_url.len() > limits.max_type_url_len => found.add(
            Code::InvalidArgument,
            "PAYLOAD_TYPE_URL",
            "event.payload.type_url",
            format!(
                "event.payload.type_url is {} bytes long, at most {} allowed",
                payload.type_url.len(),
                limits.max_type_url_len
            ),
        ),
        Some(payload) => {
            let name = payload
                .type_url
                .rsplit_once('/')
                .map_or("", |(_, name)| name);
            if name.is_empty() {
                found.add(
                    Code::InvalidArgument,
                    "PAYLOAD_TYPE_URL",
                    "event.payload.type_url",
                    format!(
                        "event.payload.type_url {} must end in /package.Message, e.g. type.googleapis.com/shop.v1.OrderPlaced",
                        quoted(&payload.type_url)
                    ),
                );
            }
            if payload.value.len() > limits.max_payload_bytes {
                found.add(
                    Code::ResourceExhausted,
                    "PAYLOAD_SIZE",
                    "event.payload",
                    format!(
                        "event.payload is {} bytes, over the limit of {}",
                        payload.value.len(),
                        limits.max_payload_bytes
                    ),
                );
            }
        }
    }
    if let Some(code) = found.code {
        return Err(Rejection {
            code,
            violations: found.violations,
            event_id: event.id,
        });
    }
    if event.id.is_empty() {
        event.id = uuid::Uuid::now_v7().to_string();
    }
    if event.occurred_at.is_none() {
        event.occurred_at = Some(prost_types::Timestamp::from(SystemTime::now()));
    }
    if event.correlation_id.is_empty() {
        event.correlation_id = event.id.clone();
    }
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Event {
        Event {
            r#type: "shop.order.placed".into(),
            payload: Some(prost_types::Any {
                type_url: "type.googleapis.com/shop.v1.OrderPlaced".into(),
                value: vec![1, 2, 3],
            }),
            ..Default::default()
        }
    }

    #[track_caller]
    fn check(edit: impl FnOnce(&mut Event), code: Code, rules: &[&str]) {
        let mut event = valid();
        edit(&mut event);
        let rejection = accept(Some(event), &Limits::default()).expect_err("must be rejected");
        assert_eq!(rejection.code, code);
        let got: Vec<&str> = rejection
            .violations
            .iter()
            .map(|v| v.rule.as_str())
            .collect();
        assert_eq!(got, rules);
    }

    #[test]
    fn fills_node_owned_fields() {
        let event = accept(Some(valid()), &Limits::default()).expect("valid");
        assert_eq!(event.id.len(), 36);
        assert_eq!(event.correlation_id, event.id);
        assert!(event.occurred_at.is_some());
    }

    #[test]
    fn rejections() {
        check(
            |e| e.id = "x".repeat(129),
            Code::InvalidArgument,
            &["ID_LENGTH"],
        );
        check(
            |e| e.id = "a b".into(),
            Code::InvalidArgument,
            &["ID_SYNTAX"],
        );
        check(
            |e| e.r#type = "Shop.Order".into(),
            Code::InvalidArgument,
            &["TYPE_SYNTAX"],
        );
        check(
            |e| e.r#type = "shop.*".into(),
            Code::InvalidArgument,
            &["TYPE_SYNTAX"],
        );
        check(
            |e| e.r#type = String::new(),
            Code::InvalidArgument,
            &["TYPE_SYNTAX"],
        );
        check(
            |e| e.schema_version = "1.0".into(),
            Code::InvalidArgument,
            &["SCHEMA_VERSION_SYNTAX"],
        );
        check(
            |e| e.source = "s".repeat(257),
            Code::InvalidArgument,
            &["FIELD_LENGTH"],
        );
        check(
            |e| e.causation_id = "c".repeat(300),
            Code::InvalidArgument,
            &["FIELD_LENGTH"],
        );
        check(
            |e| e.headers = (0..65).map(|i| (format!("h{i}"), String::new())).collect(),
            Code::ResourceExhausted,
            &["HEADER_COUNT"],
        );
        check(
            |e| {
                e.headers.insert("big".into(), "v".repeat(17 * 1024));
            },
            Code::ResourceExhausted,
            &["HEADER_SIZE"],
        );
        check(
            |e| e.payload = None,
            Code::InvalidArgument,
            &["PAYLOAD_REQUIRED"],
        );
        check(
            |e| e.payload.as_mut().expect("payload").type_url = "OrderPlaced".into(),
            Code::InvalidArgument,
            &["PAYLOAD_TYPE_URL"],
        );
        check(
            |e| e.payload.as_mut().expect("payload").value = vec![0; 1024 * 1024 + 1],
            Code::ResourceExhausted,
            &["PAYLOAD_SIZE"],
        );
        check(
            |e| {
                e.r#type = "Bad".into();
                e.payload = None;
            },
            Code::InvalidArgument,
            &["TYPE_SYNTAX", "PAYLOAD_REQUIRED"],
        );
    }
}
