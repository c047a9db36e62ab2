//! Payload validation at publish: the type must be registered, the schema version
//! must exist (empty means the latest, and is filled in), the payload's type_url
//! must name that version's message, and the bytes must decode against it with no
//! unknown fields.

use evmesh_proto::v1::{Event, Violation};
use evmesh_schema::quoted;
use prost_reflect::{
    Cardinality, DynamicMessage, Kind, MapKey, MessageDescriptor, ReflectMessage, Value,
};
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
    // The walk does not track presence, so a schema with required fields always
    // takes the full decode.
    if !entry.schema.has_required_fields() && clean(message, &payload.value, 0) {
        event.schema_version = version.to_string();
        return Ok(());
    }
    // Something to report (or something the walk does not vouch for): the full
    // decode finds it and names it.
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
    let mut found = Found::default();
    walk(&decoded, "event.payload", &mut found);
    if found.total > 0 {
        let mut violations: Vec<Violation> = found
            .listed
            .into_iter()
            .map(|(path, problem)| match problem {
                Problem::Unknown(number) => Violation {
                    rule: "PAYLOAD_UNKNOWN_FIELD".into(),
                    message: format!(
                        "{path} has field number {number}, which {} {version} does not define",
                        event.r#type
                    ),
                    path,
                },
                Problem::Missing(name) => Violation {
                    rule: "PAYLOAD_REQUIRED_FIELD".into(),
                    message: format!(
                        "{path}.{name} is required by {} {version} and missing",
                        event.r#type
                    ),
                    path: format!("{path}.{name}"),
                },
            })
            .collect();
        if found.total > violations.len() {
            violations.push(Violation {
                rule: "PAYLOAD_MORE_VIOLATIONS".into(),
                path: "event.payload".into(),
                message: format!(
                    "and {} more violations in event.payload",
                    found.total - violations.len()
                ),
            });
        }
        return Err(Rejection {
            code: Code::InvalidArgument,
            violations,
            event_id: event.id.clone(),
        });
    }
    event.schema_version = version.to_string();
    Ok(())
}

/// Nesting past which the walk leaves the payload to the full decode (whose own
/// limit is 100).
const CLEAN_DEPTH: u32 = 64;

/// Whether `bytes` certainly decode as `message` with no unknown field anywhere: a
/// walk of the wire format that allocates nothing. It vouches only for what it
/// fully checks (known field numbers, wire types that match, well-formed varints and
/// lengths, UTF-8 strings, nested messages and packed lists); anything else,
/// including every malformed payload, is left to the full decode, which says what
/// is wrong.
fn clean(message: &MessageDescriptor, mut bytes: &[u8], depth: u32) -> bool {
    if depth > CLEAN_DEPTH {
        return false;
    }
    while !bytes.is_empty() {
        let Some(key) = varint(&mut bytes) else {
            return false;
        };
        let Some(field) = u32::try_from(key >> 3)
            .ok()
            .filter(|&n| n >= 1)
            .and_then(|n| message.get_field(n))
        else {
            return false;
        };
        if field.is_group() {
            return false;
        }
        let kind = field.kind();
        let fits = match key & 7 {
            0 => is_varint(&kind) && varint(&mut bytes).is_some(),
            1 => is_fixed(&kind, 8) && skip(&mut bytes, 8),
            5 => is_fixed(&kind, 4) && skip(&mut bytes, 4),
            2 => {
                let Some(value) = varint(&mut bytes)
                    .and_then(|len| usize::try_from(len).ok())
                    .filter(|&len| len <= bytes.len())
                    .map(|len| {
                        let (value, rest) = bytes.split_at(len);
                        bytes = rest;
                        value
                    })
                else {
                    return false;
                };
                match &kind {
                    Kind::String => std::str::from_utf8(value).is_ok(),
                    Kind::Bytes => true,
                    Kind::Message(nested) => clean(nested, value, depth + 1),
                    packed if field.is_list() => clean_packed(packed, value),
                    _ => false,
                }
            }
            _ => false, // groups, and wire types 6 and 7
        };
        if !fits {
            return false;
        }
    }
    true
}

/// A packed list of scalars: whole varints, or whole fixed-width values.
fn clean_packed(kind: &Kind, mut bytes: &[u8]) -> bool {
    if is_varint(kind) {
        while !bytes.is_empty() {
            if varint(&mut bytes).is_none() {
                return false;
            }
        }
        true
    } else if is_fixed(kind, 8) {
        bytes.len().is_multiple_of(8)
    } else {
        is_fixed(kind, 4) && bytes.len().is_multiple_of(4)
    }
}

fn is_varint(kind: &Kind) -> bool {
    matches!(
        kind,
        Kind::Int32
            | Kind::Int64
            | Kind::Uint32
            | Kind::Uint64
            | Kind::Sint32
            | Kind::Sint64
            | Kind::Bool
            | Kind::Enum(_)
    )
}

fn is_fixed(kind: &Kind, width: usize) -> bool {
    match width {
        8 => matches!(kind, Kind::Fixed64 | Kind::Sfixed64 | Kind::Double),
        4 => matches!(kind, Kind::Fixed32 | Kind::Sfixed32 | Kind::Float),
        _ => false,
    }
}

/// A varint of at most ten bytes that fits 64 bits, as protobuf decoders accept.
fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        if i == 9 && byte > 1 {
            return None;
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            *bytes = &bytes[i + 1..];
            return Some(value);
        }
    }
    None
}

fn skip(bytes: &mut &[u8], n: usize) -> bool {
    match bytes.get(n..) {
        Some(rest) => {
            *bytes = rest;
            true
        }
        None => false,
    }
}

/// Violations of one payload listed at most; the rest are counted.
const MAX_LISTED: usize = 32;

enum Problem {
    /// A field number the schema does not define.
    Unknown(u32),
    /// A required field that is not set.
    Missing(String),
}

/// What the walk of a decoded payload found: the first [`MAX_LISTED`] problems
/// with their paths, and how many in all.
#[derive(Default)]
struct Found {
    listed: Vec<(String, Problem)>,
    total: usize,
}

impl Found {
    fn add(&mut self, path: &str, problem: Problem) {
        self.total += 1;
        if self.listed.len() < MAX_LISTED {
            self.listed.push((path.to_owned(), problem));
        }
    }
}

/// Every unknown field and missing required field in the message tree.
fn walk(message: &DynamicMessage, path: &str, found: &mut Found) {
    for field in message.unknown_fields() {
        found.add(path, Problem::Unknown(field.number()));
    }
    for field in message.descriptor().fields() {
        if field.cardinality() == Cardinality::Required && !message.has_field(&field) {
            found.add(path, Problem::Missing(field.name().to_owned()));
        }
    }
    for (field, value) in message.fields() {
        let path = format!("{path}.{}", field.name());
        walk_value(value, &path, found);
    }
}

fn walk_value(value: &Value, path: &str, found: &mut Found) {
    match value {
        Value::Message(m) => walk(m, path, found),
        Value::List(items) => {
            for (i, item) in items.iter().enumerate() {
                walk_value(item, &format!("{path}[{i}]"), found);
            }
        }
        Value::Map(entries) => {
            for (key, item) in entries {
                let key = match key {
                    MapKey::String(s) => quoted(s),
                    other => format!("{other:?}"),
                };
                walk_value(item, &format!("{path}[{key}]"), found);
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

    fn order_message(catalog: &Catalog) -> MessageDescriptor {
        catalog.types["shop.order.placed"][&Version::new(1, 0, 0)]
            .schema
            .message()
            .clone()
    }

    /// A valid OrderPlaced that uses every shape: strings, a nested list, a map of
    /// messages, a oneof with a varint.
    fn valid_order(catalog: &Catalog, skus: &[&str]) -> Vec<u8> {
        let message = order_message(catalog);
        let item = message
            .parent_pool()
            .get_message_by_name("shop.v1.Item")
            .unwrap();
        let mut order = DynamicMessage::new(message);
        order.set_field_by_name("id", Value::String("o-1".into()));
        let items = skus
            .iter()
            .enumerate()
            .map(|(i, sku)| {
                let mut it = DynamicMessage::new(item.clone());
                it.set_field_by_name("sku", Value::String((*sku).into()));
                it.set_field_by_name("qty", Value::I32(i as i32 - 1));
                let mut child = DynamicMessage::new(item.clone());
                child.set_field_by_name("sku", Value::String(format!("{sku}-child")));
                it.set_field_by_name("child", Value::Message(child));
                Value::Message(it)
            })
            .collect::<Vec<_>>();
        let by_sku = skus
            .iter()
            .zip(&items)
            .map(|(sku, it)| (prost_reflect::MapKey::String((*sku).into()), it.clone()))
            .collect();
        order.set_field_by_name("items", Value::List(items));
        order.set_field_by_name("by_sku", Value::Map(by_sku));
        order.set_field_by_name("cents", Value::I64(-12_345));
        order.encode_to_vec()
    }

    /// What the full decode says of `bytes`: clean, or not.
    fn decodes_clean(catalog: &Catalog, bytes: &[u8]) -> bool {
        match DynamicMessage::decode(order_message(catalog), bytes) {
            Ok(m) => {
                let mut found = Found::default();
                walk(&m, "", &mut found);
                found.total == 0
            }
            Err(_) => false,
        }
    }

    #[test]
    fn the_walk_vouches_for_valid_payloads() {
        let catalog = catalog();
        for skus in [&[][..], &["a"], &["a", "b", "ünïcode"]] {
            let bytes = valid_order(&catalog, skus);
            assert!(clean(&order_message(&catalog), &bytes, 0), "{skus:?}");
            assert!(payload(&catalog, &mut event(bytes), false).is_ok());
        }
    }

    #[test]
    fn the_walk_leaves_every_fault_to_the_full_decode() {
        let catalog = catalog();
        let message = order_message(&catalog);
        let valid = valid_order(&catalog, &["a", "b"]);
        let faults: Vec<Vec<u8>> = vec![
            valid[..valid.len() - 1].to_vec(),          // truncated
            [&valid[..], &[0x78, 0x01]].concat(),       // unknown field 15
            [&valid[..], &[0x0d, 0, 0, 0, 0]].concat(), // id (a string) as fixed32
            [&valid[..], &[0x0a, 0x01, 0xff]].concat(), // id not UTF-8
            [&valid[..], &[0x0b]].concat(),             // a group start
        ];
        for bytes in faults {
            assert!(!clean(&message, &bytes, 0), "{bytes:02x?}");
            assert!(payload(&catalog, &mut event(bytes), false).is_err());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The walk never vouches for what the full decode would refuse: random
        /// changes to a valid payload, and random bytes.
        #[test]
        fn the_walk_is_never_more_lenient(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
            cut in proptest::option::of(any::<prop::sample::Index>()),
            tail in proptest::collection::vec(any::<u8>(), 0..4),
            noise in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let catalog = catalog();
            let message = order_message(&catalog);
            let mut bytes = valid_order(&catalog, &["a", "bc"]);
            for (at, byte) in edits {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            bytes.extend(tail);
            for candidate in [bytes, noise] {
                if clean(&message, &candidate, 0) {
                    prop_assert!(decodes_clean(&catalog, &candidate), "{:02x?}", candidate);
                }
            }
        }

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
