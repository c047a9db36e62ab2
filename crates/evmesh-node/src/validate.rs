//! Payload validation at publish: the type must be registered, the schema version
//! must exist (empty means the latest, and is filled in), the payload's type_url
//! must name that version's message, and the bytes must decode against it with no
//! unknown fields.

use evmesh_proto::v1::{Event, Violation};
use prost_reflect::{DynamicMessage, Value};
use semver::Version;
use tonic::Code;

use crate::catalog::Catalog;
use crate::envelope::Rejection;

fn reject(code: Code, rule: &str, path: &str, message: String, event: &Event) -> Rejection {
    Rejection {
        code,
        violations: vec![Violation {
            rule: rule.to_owned(),
            path: path.to_owned(),
            message,
        }],
        event_id: event.id.clone(),
    }
}

/// Validates the payload of an envelope that passed the envelope checks, and
/// records the schema version it was validated against. Types with no registered
/// schema pass unvalidated only when `allow_unregistered`.
pub(crate) fn payload(
    catalog: &Catalog,
    event: &mut Event,
    allow_unregistered: bool,
) -> Result<(), Rejection> {
    let Some(versions) = catalog.types.get(&event.r#type) else {
        if allow_unregistered {
            return Ok(());
        }
        return Err(reject(
            Code::FailedPrecondition,
            "SCHEMA_NOT_REGISTERED",
            "event.type",
            format!(
                "event.type {:?} has no registered schema: register one with `evmesh schema register`",
                event.r#type
            ),
            event,
        ));
    };
    let requested = if event.schema_version.is_empty() {
        None
    } else {
        // The envelope check already made sure it parses.
        Version::parse(&event.schema_version).ok()
    };
    let Some((version, entry)) = catalog.resolve(&event.r#type, requested.as_ref()) else {
        let known: Vec<String> = versions.keys().map(Version::to_string).collect();
        return Err(reject(
            Code::FailedPrecondition,
            "SCHEMA_VERSION_UNKNOWN",
            "event.schema_version",
            format!(
                "event.schema_version {} is not registered for {}; registered: {}",
                event.schema_version,
                event.r#type,
                known.join(", ")
            ),
            event,
        ));
    };
    let message = entry.schema.message();
    let Some(payload) = &event.payload else {
        return Ok(()); // the envelope check requires it
    };
    let named = payload
        .type_url
        .rsplit_once('/')
        .map_or("", |(_, name)| name);
    if named != message.full_name() {
        return Err(reject(
            Code::InvalidArgument,
            "PAYLOAD_TYPE",
            "event.payload.type_url",
            format!(
                "event.payload.type_url names {named}, but {} {version} carries {}",
                event.r#type,
                message.full_name()
            ),
            event,
        ));
    }
    let decoded = match DynamicMessage::decode(message.clone(), payload.value.as_slice()) {
        Ok(decoded) => decoded,
        Err(e) => {
            return Err(reject(
                Code::InvalidArgument,
                "PAYLOAD_DECODE",
                "event.payload.value",
                format!(
                    "event.payload.value does not decode as {}: {e}",
                    message.full_name()
                ),
                event,
            ));
        }
    };
    let mut unknown = Vec::new();
    unknown_fields(&decoded, "event.payload", &mut unknown);
    if !unknown.is_empty() {
        let violations = unknown
            .into_iter()
            .map(|(path, number)| Violation {
                rule: "PAYLOAD_UNKNOWN_FIELD".into(),
                message: format!(
                    "{path} has field number {number}, which {} {version} does not define",
                    event.r#type
                ),
                path,
            })
            .collect();
        return Err(Rejection {
            code: Code::InvalidArgument,
            violations,
            event_id: event.id.clone(),
        });
    }
    event.schema_version = version.to_string();
    Ok(())
}

/// Every unknown field in the message tree: (path, field number).
fn unknown_fields(message: &DynamicMessage, path: &str, out: &mut Vec<(String, u32)>) {
    for field in message.unknown_fields() {
        out.push((path.to_owned(), field.number()));
    }
    for (field, value) in message.fields() {
        let path = format!("{path}.{}", field.name());
        value_unknowns(value, &path, out);
    }
}

fn value_unknowns(value: &Value, path: &str, out: &mut Vec<(String, u32)>) {
    match value {
        Value::Message(m) => unknown_fields(m, path, out),
        Value::List(items) => {
            for (i, item) in items.iter().enumerate() {
                value_unknowns(item, &format!("{path}[{i}]"), out);
            }
        }
        Value::Map(entries) => {
            for (key, item) in entries {
                value_unknowns(item, &format!("{path}[{key:?}]"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use evmesh_schema::Schema;
    use proptest::prelude::*;
    use prost::Message;

    use super::*;
    use crate::catalog::Entry;

    fn catalog() -> Catalog {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("order.proto"),
            "syntax = \"proto3\";\npackage shop.v1;\n\
             message Item { string sku = 1; int32 qty = 2; Item child = 3; }\n\
             message OrderPlaced { string id = 1; repeated Item items = 2; map<string, Item> by_sku = 3; \
             oneof pay { string card = 4; int64 cents = 5; } }\n",
        )
        .unwrap();
        let set = protox::compile(["order.proto"], [dir.path()]).unwrap();
        let schema = Schema::new(&set.encode_to_vec(), "shop.v1.OrderPlaced").unwrap();
        let mut versions = BTreeMap::new();
        versions.insert(
            Version::new(1, 0, 0),
            Arc::new(Entry {
                schema,
                registered_at: std::time::SystemTime::now(),
            }),
        );
        Catalog {
            types: [("shop.order.placed".to_owned(), versions)]
                .into_iter()
                .collect(),
            reflection: Default::default(),
        }
    }

    fn event(value: Vec<u8>) -> Event {
        Event {
            r#type: "shop.order.placed".into(),
            payload: Some(prost_types::Any {
                type_url: "type.googleapis.com/shop.v1.OrderPlaced".into(),
                value,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn unknown_fields_are_found_deep_down() {
        let catalog = catalog();
        // items[0] = Item { child: Item { <field 15 = 1> } }
        let child = vec![0x78, 0x01];
        let mut inner = vec![0x1a, child.len() as u8];
        inner.extend(&child);
        let mut bytes = vec![0x12, inner.len() as u8];
        bytes.extend(&inner);
        let rejection = payload(&catalog, &mut event(bytes), false).unwrap_err();
        assert_eq!(rejection.violations[0].path, "event.payload.items[0].child");
        assert!(rejection.violations[0].message.contains("field number 15"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_payload_bytes_are_accepted_or_rejected_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let catalog = catalog();
            let mut e = event(bytes);
            if payload(&catalog, &mut e, false).is_ok() {
                prop_assert_eq!(e.schema_version.as_str(), "1.0.0");
            }
        }
    }
}
