//! Payload validation at publish: the type must be registered, the schema version
//! must exist (empty means the latest, and is filled in), the payload's type_url
//! must name that version's message, and the bytes must decode against it with no
//! unknown fields.

use evmesh_proto::v1::{Event, Violation};
use evmesh_schema::quoted;
use prost_reflect::{
    Cardinality, DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, ReflectMessage,
    Value,
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

/// Validates `bytes` as a payload of `schema`'s message, as a publish would: for
/// the fuzz targets (`fuzz/`), through [`crate::fuzzing`].
pub(crate) fn payload_of(schema: &evmesh_schema::Schema, bytes: &[u8]) -> Result<(), Rejection> {
    let catalog = Catalog::single("fuzz.payload", schema.clone());
    let mut event = Event {
        r#type: "fuzz.payload".into(),
        payload: Some(prost_types::Any {
            type_url: format!("type.googleapis.com/{}", schema.message_name()),
            value: bytes.to_vec(),
        }),
        ..Event::default()
    };
    payload(&catalog, &mut event, false)
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
    let schema = match catalog.schema(&event.r#type, version, entry) {
        Ok(schema) => schema,
        Err(e) => {
            tracing::error!(event_type = %event.r#type, version = %version, error = %e, "a stored schema does not compile");
            return Err(reject(
                Code::FailedPrecondition,
                "SCHEMA_UNREADABLE",
                "event.schema_version",
                format!(
                    "version {version} of {} is registered but its stored schema no longer compiles ({e}); publish with another version",
                    event.r#type
                ),
                event,
            ));
        }
    };
    let message = schema.message();
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
    // takes the scan.
    if !schema.has_required_fields() && clean(message, &payload.value, 0) {
        event.schema_version = version.to_string();
        return Ok(());
    }
    // Something to report (or something the walk does not vouch for): the scan
    // finds it and names it, allocating only what it lists; a shape it leaves alone
    // goes to prost-reflect's full decode.
    let found = match scan(message, &payload.value, schema.has_required_fields()) {
        Ok(found) => found,
        Err(Stop::Malformed(what)) => return Err(undecodable(message, what, event)),
        Err(Stop::Unsure) => {
            match DynamicMessage::decode(message.clone(), payload.value.as_slice()) {
                Ok(decoded) => {
                    let mut found = Found::default();
                    walk(&decoded, "event.payload", &mut found);
                    found
                }
                Err(e) => return Err(undecodable(message, e.to_string(), event)),
            }
        }
    };
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

fn undecodable(message: &MessageDescriptor, what: String, event: &Event) -> Rejection {
    reject(
        Code::InvalidArgument,
        "PAYLOAD_DECODE",
        "event.payload.value",
        format!(
            "event.payload.value does not decode as {}: {what}",
            message.full_name()
        ),
        event,
    )
}

/// Nesting past which the walk leaves the payload to the scan.
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

/// Nesting of embedded messages that decoders accept (prost's recursion limit): the
/// payload's message is at depth 0.
const MAX_DEPTH: u32 = 100;

/// Why [`scan`] stopped short.
enum Stop {
    /// The bytes are not an encoding of the message: what is wrong, and where.
    Malformed(String),
    /// A shape the scan leaves to the full decode: a field declared as a proto2 group.
    Unsure,
}

/// One step of the path from the payload to where the scan is.
enum Step {
    Field(FieldDescriptor),
    Index(usize),
    Key(String),
}

/// The payload's unknown fields and missing required fields, with their paths,
/// found on the wire format itself: what the full decode and [`walk`] would find,
/// at a cost of the listed paths and the path being scanned. A decoded payload
/// takes about a hundred times its size (a 1 MiB payload of small items, over
/// 100 MB), and every payload the fast walk does not vouch for comes here.
fn scan(message: &MessageDescriptor, bytes: &[u8], required: bool) -> Result<Found, Stop> {
    let mut scan = Scan {
        found: Found::default(),
        path: Vec::new(),
        required,
    };
    scan.message(message, bytes, 0)?;
    Ok(scan.found)
}

struct Scan {
    found: Found,
    path: Vec<Step>,
    /// Whether some message of the schema has required fields to look for.
    required: bool,
}

impl Scan {
    fn here(&self) -> String {
        let mut path = String::from("event.payload");
        for step in &self.path {
            match step {
                Step::Field(field) => {
                    path.push('.');
                    path.push_str(field.name());
                }
                Step::Index(i) => path.push_str(&format!("[{i}]")),
                Step::Key(key) => path.push_str(&format!("[{key}]")),
            }
        }
        path
    }

    fn malformed(&self, what: &str) -> Stop {
        Stop::Malformed(format!("{what}, at {}", self.here()))
    }

    fn add(&mut self, problem: Problem) {
        if self.found.listed.len() < MAX_LISTED {
            let here = self.here();
            self.found.add(&here, problem);
        } else {
            self.found.total += 1;
        }
    }

    fn message(
        &mut self,
        message: &MessageDescriptor,
        mut bytes: &[u8],
        depth: u32,
    ) -> Result<(), Stop> {
        if depth > MAX_DEPTH {
            return Err(self.malformed(&format!("messages nested more than {MAX_DEPTH} deep")));
        }
        let mut seen: Vec<u32> = Vec::new();
        // Items seen so far of each repeated message field, for their paths.
        let mut items: Vec<(u32, usize)> = Vec::new();
        // A singular message field sent more than once is one message, merged: the
        // concatenation of its parts, scanned once all are in.
        let mut singular: Vec<(FieldDescriptor, MessageDescriptor, Vec<&[u8]>)> = Vec::new();
        while !bytes.is_empty() {
            let (number, wire) = self.key(&mut bytes)?;
            let Some(field) = message.get_field(number) else {
                self.skip_unknown(number, wire, &mut bytes, depth)?;
                self.add(Problem::Unknown(number));
                continue;
            };
            if field.is_group() {
                return Err(Stop::Unsure);
            }
            if self.required && field.cardinality() == Cardinality::Required {
                seen.push(number);
            }
            if let Kind::Message(nested) = field.kind()
                && !field.is_list()
                && !field.is_map()
                && wire == 2
            {
                self.path.push(Step::Field(field.clone()));
                let part = self.delimited(&mut bytes);
                self.path.pop();
                match singular.iter_mut().find(|(f, _, _)| f.number() == number) {
                    Some((_, _, parts)) => parts.push(part?),
                    None => singular.push((field, nested, vec![part?])),
                }
                continue;
            }
            let item =
                (field.is_list() && matches!(field.kind(), Kind::Message(_))).then(|| match items
                    .iter_mut()
                    .find(|(n, _)| *n == number)
                {
                    Some((_, count)) => {
                        *count += 1;
                        *count - 1
                    }
                    None => {
                        items.push((number, 1));
                        0
                    }
                });
            self.path.push(Step::Field(field.clone()));
            if let Some(i) = item {
                self.path.push(Step::Index(i));
            }
            let scanned = self.field(&field, wire, &mut bytes, depth);
            if item.is_some() {
                self.path.pop();
            }
            self.path.pop();
            scanned?;
        }
        for (field, nested, parts) in singular {
            self.path.push(Step::Field(field));
            let scanned = self.merged(&nested, &parts, depth);
            self.path.pop();
            scanned?;
        }
        if self.required {
            self.missing(message, &seen);
        }
        Ok(())
    }

    /// A message sent in parts (a singular message field, or a map entry's value,
    /// sent more than once) is one message, merged: the concatenation of its parts.
    /// A decoder reads each part within its own length, so a field that runs from
    /// one part into the next is malformed, though the concatenation frames (found
    /// by fuzzing).
    fn merged(
        &mut self,
        message: &MessageDescriptor,
        parts: &[&[u8]],
        depth: u32,
    ) -> Result<(), Stop> {
        if let [one] = parts {
            return self.message(message, one, depth + 1);
        }
        let framed: Vec<Option<bool>> = parts.iter().map(|p| frames(p)).collect();
        if framed.contains(&Some(false)) {
            Err(self.malformed("a field that runs past the end of its message"))
        } else if framed.contains(&None) {
            Err(Stop::Unsure)
        } else {
            self.message(message, &parts.concat(), depth + 1)
        }
    }

    /// Required fields of `message` that are not among `seen`.
    fn missing(&mut self, message: &MessageDescriptor, seen: &[u32]) {
        for field in message.fields() {
            if field.cardinality() == Cardinality::Required && !seen.contains(&field.number()) {
                self.add(Problem::Missing(field.name().to_owned()));
            }
        }
    }

    /// A field key: its number (1 to 2^29 - 1) and wire type.
    fn key(&self, bytes: &mut &[u8]) -> Result<(u32, u64), Stop> {
        let key =
            varint(bytes).ok_or_else(|| self.malformed("a field key that is not a varint"))?;
        match u32::try_from(key >> 3) {
            Ok(number) if key <= u64::from(u32::MAX) && number >= 1 => Ok((number, key & 7)),
            _ => Err(self.malformed(&format!("invalid field key {key}"))),
        }
    }

    fn delimited<'b>(&self, bytes: &mut &'b [u8]) -> Result<&'b [u8], Stop> {
        let value = varint(bytes)
            .and_then(|len| usize::try_from(len).ok())
            .filter(|&len| len <= bytes.len())
            .map(|len| {
                let (value, rest) = bytes.split_at(len);
                *bytes = rest;
                value
            });
        value.ok_or_else(|| self.malformed("a length past the end of the payload"))
    }

    /// One value of a known field (not a group).
    fn field(
        &mut self,
        field: &FieldDescriptor,
        wire: u64,
        bytes: &mut &[u8],
        depth: u32,
    ) -> Result<(), Stop> {
        let kind = field.kind();
        let fits = match wire {
            0 => is_varint(&kind) && varint(bytes).is_some(),
            1 => is_fixed(&kind, 8) && skip(bytes, 8),
            5 => is_fixed(&kind, 4) && skip(bytes, 4),
            2 => {
                let value = self.delimited(bytes)?;
                match &kind {
                    Kind::String => {
                        if std::str::from_utf8(value).is_err() {
                            return Err(self.malformed("a string that is not UTF-8"));
                        }
                        true
                    }
                    Kind::Bytes => true,
                    Kind::Message(entry) if field.is_map() => {
                        return self.map_entry(entry, value, depth);
                    }
                    Kind::Message(nested) => return self.message(nested, value, depth + 1),
                    packed if field.is_list() => clean_packed(packed, value),
                    _ => false,
                }
            }
            _ => false,
        };
        if fits {
            Ok(())
        } else {
            let kind = match &kind {
                Kind::Message(m) => m.full_name().to_owned(),
                Kind::Enum(e) => e.full_name().to_owned(),
                scalar => format!("{scalar:?}").to_lowercase(),
            };
            Err(self.malformed(&format!(
                "field {} ({kind}) holds a value of wire type {wire}, or one cut short",
                field.name()
            )))
        }
    }

    /// A map entry: its key names the value's path. Other fields of an entry are
    /// dropped by decoders, so they are not violations.
    fn map_entry(
        &mut self,
        entry: &MessageDescriptor,
        mut bytes: &[u8],
        depth: u32,
    ) -> Result<(), Stop> {
        let (key_field, value_field) = (entry.map_entry_key_field(), entry.map_entry_value_field());
        let mut key: Option<String> = None;
        let mut values: Vec<&[u8]> = Vec::new();
        let mut value_seen = false;
        while !bytes.is_empty() {
            let (number, wire) = self.key(&mut bytes)?;
            match number {
                1 => {
                    let start = bytes;
                    self.field(&key_field, wire, &mut bytes, depth)?;
                    key = Some(map_key(
                        &key_field.kind(),
                        &start[..start.len() - bytes.len()],
                        wire,
                    ));
                }
                2 if matches!(value_field.kind(), Kind::Message(_)) && wire == 2 => {
                    values.push(self.delimited(&mut bytes)?);
                    value_seen = true;
                }
                2 => {
                    self.field(&value_field, wire, &mut bytes, depth)?;
                    value_seen = true;
                }
                other => self.skip_unknown(other, wire, &mut bytes, depth)?,
            }
        }
        let Kind::Message(value) = value_field.kind() else {
            return Ok(());
        };
        let key = key.unwrap_or_else(|| map_key(&key_field.kind(), &[], 0));
        self.path.push(Step::Key(key));
        let mut scanned = Ok(());
        if value_seen {
            scanned = self.merged(&value, &values, depth);
        } else if self.required {
            self.missing(&value, &[]);
        }
        self.path.pop();
        scanned
    }

    /// Skips the value of a field the message does not define. A group is skipped
    /// to its end; its fields, unknown too, are not counted apart.
    fn skip_unknown(
        &self,
        number: u32,
        wire: u64,
        bytes: &mut &[u8],
        depth: u32,
    ) -> Result<(), Stop> {
        let skipped = match wire {
            0 => varint(bytes).is_some(),
            1 => skip(bytes, 8),
            5 => skip(bytes, 4),
            2 => {
                self.delimited(bytes)?;
                true
            }
            3 => {
                if depth >= MAX_DEPTH {
                    return Err(
                        self.malformed(&format!("groups nested more than {MAX_DEPTH} deep"))
                    );
                }
                loop {
                    if bytes.is_empty() {
                        return Err(self.malformed(&format!("group {number} without its end")));
                    }
                    let (inner, inner_wire) = self.key(bytes)?;
                    if inner_wire == 4 {
                        if inner != number {
                            return Err(self.malformed(&format!("group {number} ended as {inner}")));
                        }
                        break true;
                    }
                    self.skip_unknown(inner, inner_wire, bytes, depth + 1)?;
                }
            }
            _ => false,
        };
        if skipped {
            Ok(())
        } else {
            Err(self.malformed(&format!(
                "field {number} with wire type {wire} cut short or invalid"
            )))
        }
    }
}

/// A map key as [`walk`] shows it: a string quoted short, another key as
/// prost-reflect's `MapKey` prints it.
fn map_key(kind: &Kind, mut encoded: &[u8], wire: u64) -> String {
    let key = if encoded.is_empty() {
        MapKey::default_value(kind)
    } else {
        match (kind, wire) {
            (Kind::String, _) => {
                let value = varint(&mut encoded)
                    .and_then(|len| usize::try_from(len).ok())
                    .and_then(|len| encoded.get(..len))
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .unwrap_or_default();
                MapKey::String(value.to_owned())
            }
            (Kind::Bool, _) => MapKey::Bool(varint(&mut encoded).unwrap_or(0) != 0),
            (Kind::Int32, _) => MapKey::I32(varint(&mut encoded).unwrap_or(0) as i32),
            (Kind::Int64, _) => MapKey::I64(varint(&mut encoded).unwrap_or(0) as i64),
            (Kind::Uint32, _) => MapKey::U32(varint(&mut encoded).unwrap_or(0) as u32),
            (Kind::Uint64, _) => MapKey::U64(varint(&mut encoded).unwrap_or(0)),
            (Kind::Sint32, _) => {
                let n = varint(&mut encoded).unwrap_or(0) as u32;
                MapKey::I32(((n >> 1) as i32) ^ -((n & 1) as i32))
            }
            (Kind::Sint64, _) => {
                let n = varint(&mut encoded).unwrap_or(0);
                MapKey::I64(((n >> 1) as i64) ^ -((n & 1) as i64))
            }
            (Kind::Fixed32, _) => MapKey::U32(u32::from_le_bytes(le(encoded))),
            (Kind::Sfixed32, _) => MapKey::I32(i32::from_le_bytes(le(encoded))),
            (Kind::Fixed64, _) => MapKey::U64(u64::from_le_bytes(le(encoded))),
            (Kind::Sfixed64, _) => MapKey::I64(i64::from_le_bytes(le(encoded))),
            _ => MapKey::default_value(kind),
        }
    };
    show_key(&key)
}

fn le<const N: usize>(bytes: &[u8]) -> [u8; N] {
    bytes
        .get(..N)
        .and_then(|b| b.try_into().ok())
        .unwrap_or([0; N])
}

fn show_key(key: &MapKey) -> String {
    match key {
        MapKey::String(s) => quoted(s),
        other => format!("{other:?}"),
    }
}

/// Whether `part` is a run of whole fields, each key and value within it: `None`
/// when it holds a group, whose framing the full decode judges.
fn frames(mut part: &[u8]) -> Option<bool> {
    while !part.is_empty() {
        let Some(key) = varint(&mut part) else {
            return Some(false);
        };
        let whole = match key & 7 {
            0 => varint(&mut part).is_some(),
            1 => skip(&mut part, 8),
            5 => skip(&mut part, 4),
            2 => varint(&mut part)
                .and_then(|n| usize::try_from(n).ok())
                .is_some_and(|n| skip(&mut part, n)),
            3 | 4 => return None,
            _ => false,
        };
        if !whole {
            return Some(false);
        }
    }
    Some(true)
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
                walk_value(item, &format!("{path}[{}]", show_key(key)), found);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use evmesh_schema::Schema;
    use proptest::prelude::*;
    use prost::Message;

    use super::*;

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
        Catalog::single("shop.order.placed", schema)
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
        let version = Version::new(1, 0, 0);
        let entry = &catalog.types["shop.order.placed"][&version];
        catalog
            .schema("shop.order.placed", &version, entry)
            .unwrap()
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
    fn the_walk_leaves_every_fault_to_the_scan() {
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

    /// Whether the scan refused a map field sent with a wire type other than 2.
    fn lax_map_decode(what: &str) -> bool {
        what.contains("Entry) holds a value of wire type") && !what.contains("wire type 2")
    }

    /// A map field (by_sku, field 3) sent with wire type 1: the scan refuses it, and
    /// prost-reflect reads the bytes after the key as a length-delimited entry.
    #[test]
    fn a_map_field_of_the_wrong_wire_type_is_malformed() {
        let catalog = catalog();
        let message = order_message(&catalog);
        let bytes = [
            0x0a, 0x03, b'o', b'-', b'1', // id
            0x19, 0x07, 0x0a, 0x01, b'a', 0x12, 0x02, 0x0a, 0x00, // by_sku, wire type 1
        ];
        match scan(&message, &bytes, false) {
            Err(Stop::Malformed(what)) => assert!(lax_map_decode(&what), "{what}"),
            _ => panic!("the scan took a map field of wire type 1"),
        }
        assert!(
            full(&catalog, &bytes).is_ok(),
            "prost-reflect changed: drop lax_map_decode"
        );
    }

    /// What the full decode and its walk find: the decode error, or the problems.
    fn full(catalog: &Catalog, bytes: &[u8]) -> Result<Found, String> {
        let decoded =
            DynamicMessage::decode(order_message(catalog), bytes).map_err(|e| e.to_string())?;
        let mut found = Found::default();
        walk(&decoded, "event.payload", &mut found);
        Ok(found)
    }

    fn listed(found: &Found) -> Vec<String> {
        let mut listed: Vec<String> = found
            .listed
            .iter()
            .map(|(path, problem)| match problem {
                Problem::Unknown(n) => format!("{path} #{n}"),
                Problem::Missing(name) => format!("{path} !{name}"),
            })
            .collect();
        listed.sort();
        listed
    }

    /// Length-delimited field `number` holding `value`.
    fn delimited(number: u8, value: &[u8]) -> Vec<u8> {
        let mut out = vec![(number << 3) | 2];
        let mut len = value.len();
        while len >= 0x80 {
            out.push((len as u8 & 0x7f) | 0x80);
            len >>= 7;
        }
        out.push(len as u8);
        out.extend_from_slice(value);
        out
    }

    /// Found by `cargo fuzz run payload`: a singular message field sent twice,
    /// whose first part ends inside a string that the second part's bytes would
    /// complete. Each part alone does not frame, so the payload does not decode.
    #[test]
    fn a_field_may_not_run_from_one_part_of_a_message_into_the_next() {
        let catalog = catalog();
        // items[0].child sent twice; the first part declares a 5-byte sku with 2
        // bytes left in it, the second frames on its own (a length-delimited field
        // 2), and together they make one sku, "ab\x12\x01z".
        let first = [0x0a, 0x05, b'a', b'b'];
        let second = [0x12, 0x01, b'z'];
        let child = [delimited(3, &first), delimited(3, &second)].concat();
        refused_as_running_past_the_end(&catalog, delimited(2, &child));
    }

    /// What neither the full decode nor validation takes: a field that runs past
    /// the end of its part.
    fn refused_as_running_past_the_end(catalog: &Catalog, bytes: Vec<u8>) {
        let message = order_message(catalog);
        assert!(DynamicMessage::decode(message, bytes.as_slice()).is_err());
        let rejection = payload(catalog, &mut event(bytes), false).unwrap_err();
        assert!(
            rejection.violations[0]
                .message
                .contains("runs past the end"),
            "{rejection:?}"
        );
    }

    /// Found by `cargo fuzz run payload`: the same, in a map entry's value sent
    /// twice.
    #[test]
    fn a_field_may_not_run_from_one_part_of_a_map_value_into_the_next() {
        let catalog = catalog();
        let first = [0x0a, 0x05, b'a', b'b'];
        let second = [0x12, 0x01, b'z'];
        let entry = [
            delimited(1, b"k"),
            delimited(2, &first),
            delimited(2, &second),
        ]
        .concat();
        refused_as_running_past_the_end(&catalog, delimited(3, &entry));
    }

    #[test]
    fn the_scan_names_what_the_full_decode_names() {
        let catalog = catalog();
        let message = order_message(&catalog);
        let valid = valid_order(&catalog, &["a", "b"]);
        let unknown = [0x78, 0x01]; // field 15 = 1
        let child_with_unknown = delimited(3, &unknown);
        let payloads = [
            // Unknown at the top, in the second item, in its child, and in a map
            // value whose entry names its key.
            [&valid[..], &unknown].concat(),
            [
                &valid[..],
                &delimited(2, &child_with_unknown),
                &delimited(2, &[&delimited(1, b"z")[..], &unknown].concat()),
            ]
            .concat(),
            [
                &valid[..],
                &delimited(
                    3,
                    &[&delimited(1, b"k\"q")[..], &delimited(2, &unknown)].concat(),
                ),
            ]
            .concat(),
            // A child sent in two parts is one child.
            [&delimited(
                2,
                &[&delimited(3, &unknown)[..], &delimited(3, &unknown)].concat(),
            )[..]]
            .concat(),
        ];
        for bytes in payloads {
            let scanned = scan(&message, &bytes, false).unwrap_or_else(|_| panic!("{bytes:02x?}"));
            let full = full(&catalog, &bytes).unwrap();
            assert!(scanned.total > 0);
            assert_eq!(scanned.total, full.total, "{bytes:02x?}");
            assert_eq!(listed(&scanned), listed(&full), "{bytes:02x?}");
        }
    }

    #[test]
    fn the_scan_says_where_a_payload_stops_decoding() {
        let catalog = catalog();
        let valid = valid_order(&catalog, &["a"]);
        for (bytes, says) in [
            (
                [&valid[..], &[0x10, 0x01]].concat(),
                "field items (shop.v1.item) holds a value of wire type 0",
            ),
            (
                [&valid[..], &delimited(2, &[0x0a, 0x01, 0xff])].concat(),
                "a string that is not UTF-8, at event.payload.items[1].sku",
            ),
            (valid[..valid.len() - 1].to_vec(), "at event.payload"),
        ] {
            let rejection = payload(&catalog, &mut event(bytes), false).unwrap_err();
            let message = &rejection.violations[0].message;
            assert_eq!(rejection.violations[0].rule, "PAYLOAD_DECODE");
            assert!(
                message.to_lowercase().contains(&says.to_lowercase()),
                "{message}"
            );
        }
    }

    #[test]
    fn the_scan_lists_without_decoding_a_flood() {
        let catalog = catalog();
        let message = order_message(&catalog);
        // 100,000 items, each with an unknown field.
        let item = delimited(2, &[0x78, 0x01]);
        let bytes: Vec<u8> = std::iter::repeat_n(item, 100_000).flatten().collect();
        let found = scan(&message, &bytes, false).unwrap_or_else(|_| panic!("scanned"));
        assert_eq!(found.total, 100_000);
        assert_eq!(found.listed.len(), MAX_LISTED);
        assert_eq!(found.listed[31].0, "event.payload.items[31]");
        let rejection = payload(&catalog, &mut event(bytes), false).unwrap_err();
        assert_eq!(rejection.violations.len(), MAX_LISTED + 1);
        assert!(
            rejection.violations[MAX_LISTED]
                .message
                .contains("99968 more")
        );
    }

    #[test]
    fn the_scan_stops_where_decoders_stop_nesting() {
        let catalog = catalog();
        let message = order_message(&catalog);
        // items[0].child.child… `levels` messages below the payload.
        let nested = |levels: usize| {
            let mut inner = delimited(1, b"x");
            for _ in 1..levels {
                inner = [&delimited(1, b"x")[..], &delimited(3, &inner)].concat();
            }
            delimited(2, &inner)
        };
        for levels in [99, 100, 101, 102] {
            let bytes = nested(levels);
            let scanned = scan(&message, &bytes, false);
            let full = full(&catalog, &bytes);
            assert_eq!(full.is_err(), levels > 100, "{levels} levels");
            assert_eq!(
                matches!(scanned, Err(Stop::Malformed(_))),
                full.is_err(),
                "{levels} levels: {:?}",
                full.err()
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Random changes to a valid payload, and random bytes: the walk never
        /// vouches for what the full decode would refuse; the scan and the full
        /// decode agree on what is malformed, and the scan finds a problem whenever
        /// the full decode does (it may find more in parts a decoder drops: a map
        /// entry whose key comes again, a oneof member replaced by another).
        #[test]
        fn the_walk_and_the_scan_hold_to_the_full_decode(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
            cut in proptest::option::of(any::<prop::sample::Index>()),
            tail in proptest::collection::vec(any::<u8>(), 0..6),
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
                let full = full(&catalog, &candidate);
                if clean(&message, &candidate, 0) {
                    prop_assert!(decodes_clean(&catalog, &candidate), "{:02x?}", candidate);
                }
                match scan(&message, &candidate, false) {
                    Ok(found) => {
                        let full = full.map_err(|e| TestCaseError::fail(format!("{e}: {candidate:02x?}")))?;
                        prop_assert!(found.total >= full.total, "{:02x?}", candidate);
                        prop_assert_eq!(found.total == 0, full.total == 0, "{:02x?}", candidate);
                    }
                    // prost-reflect reads a map field's entry as length-delimited
                    // whatever wire type its key gives (0.16.5), where the scan, as
                    // protobuf's wire format has it, refuses a map field of another
                    // wire type: the one place the decoder is the laxer.
                    Err(Stop::Malformed(what))
                        if full.is_ok() && lax_map_decode(&what) => {}
                    Err(Stop::Malformed(what)) => {
                        prop_assert!(full.is_err(), "{what}: {:02x?}", candidate);
                    }
                    Err(Stop::Unsure) => {}
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
