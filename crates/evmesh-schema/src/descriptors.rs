//! What protoc would refuse in a descriptor set, found before and after
//! prost-reflect builds its pool: prost-reflect accepts some invalid sets (an import
//! cycle, a map entry without a value) and panics on others (an unknown syntax), and
//! the rest of evmesh must never meet either.

use std::collections::HashMap;

use prost_reflect::{Cardinality, DescriptorPool, Kind, MessageDescriptor};
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorProto, FileDescriptorSet};

use crate::check::kind_name;
use crate::schema::SchemaError;

/// Bounds on one schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaLimits {
    /// Bytes of the encoded descriptor set as sent.
    pub max_bytes: usize,
    /// Messages and enums in the set, nested ones included.
    pub max_types: usize,
    /// Fields and enum values in the set.
    pub max_fields: usize,
}

impl Default for SchemaLimits {
    fn default() -> Self {
        Self {
            max_bytes: 1024 * 1024,
            max_types: 10_000,
            max_fields: 100_000,
        }
    }
}

impl SchemaLimits {
    /// No bounds: for schemas that were accepted once already.
    pub fn none() -> Self {
        Self {
            max_bytes: usize::MAX,
            max_types: usize::MAX,
            max_fields: usize::MAX,
        }
    }
}

fn invalid(message: String) -> SchemaError {
    SchemaError::Invalid(message)
}

/// A string from the input as a status or an error quotes it: whole when short,
/// else a prefix and its length, so that no message grows with what a client sent.
pub fn quoted(s: &str) -> String {
    const SHOWN: usize = 64;
    if s.len() <= SHOWN {
        return format!("{s:?}");
    }
    let mut end = SHOWN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &s[..end], s.len())
}

/// Longest name of a package part, message, field, enum or value.
const MAX_NAME_LEN: usize = 256;

fn is_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    s.len() <= MAX_NAME_LEN
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn identifier(what: &str, name: &str, file: &str) -> Result<(), SchemaError> {
    if is_identifier(name) {
        Ok(())
    } else {
        Err(invalid(format!(
            "file {}: {what} name {} is not an identifier (a letter or '_', then letters, digits or '_', at most {MAX_NAME_LEN} bytes)",
            quoted(file),
            quoted(name)
        )))
    }
}

/// Checks what the pool would panic on or silently accept, on the set as sent, and
/// normalises what protoc treats as equal (an empty syntax is proto2).
pub(crate) fn before_pool(
    set: &mut FileDescriptorSet,
    limits: &SchemaLimits,
) -> Result<(), SchemaError> {
    let mut types = 0usize;
    let mut fields = 0usize;
    for file in &mut set.file {
        let name = file.name().to_owned();
        if name.is_empty() {
            return Err(invalid("a file has an empty name".into()));
        }
        match file.syntax.as_deref() {
            None | Some("proto2" | "proto3") => {}
            Some("") => file.syntax = None,
            Some("editions") => {
                return Err(invalid(format!(
                    "file {}: editions are not supported; use syntax proto2 or proto3",
                    quoted(&name)
                )));
            }
            Some(other) => {
                return Err(invalid(format!(
                    "file {}: unknown syntax {}; use proto2 or proto3",
                    quoted(&name),
                    quoted(other)
                )));
            }
        }
        let proto3 = file.syntax.as_deref() == Some("proto3");
        if !file.package().is_empty() {
            for part in file.package().split('.') {
                identifier("package", part, &name)?;
            }
        }
        for e in &file.enum_type {
            identifier("enum", e.name(), &name)?;
            types += 1;
            fields += e.value.len();
            for v in &e.value {
                identifier("enum value", v.name(), &name)?;
            }
        }
        for s in &file.service {
            identifier("service", s.name(), &name)?;
            for m in &s.method {
                identifier("method", m.name(), &name)?;
            }
        }
        for f in &file.extension {
            identifier("extension", f.name(), &name)?;
        }
        let mut todo: Vec<&DescriptorProto> = file.message_type.iter().collect();
        while let Some(m) = todo.pop() {
            identifier("message", m.name(), &name)?;
            types += 1 + m.enum_type.len();
            fields += m.field.len() + m.extension.len();
            for f in m.field.iter().chain(&m.extension) {
                identifier("field", f.name(), &name)?;
                if proto3 && f.r#type == Some(Type::Group as i32) {
                    return Err(invalid(format!(
                        "file {}: field {}.{} is a group; groups are not allowed in proto3",
                        quoted(&name),
                        m.name(),
                        f.name()
                    )));
                }
                if proto3 && f.label == Some(Label::Required as i32) {
                    return Err(invalid(format!(
                        "file {}: field {}.{} is required; required fields are not allowed in proto3",
                        quoted(&name),
                        m.name(),
                        f.name()
                    )));
                }
            }
            for o in &m.oneof_decl {
                identifier("oneof", o.name(), &name)?;
            }
            for e in &m.enum_type {
                identifier("enum", e.name(), &name)?;
                fields += e.value.len();
                for v in &e.value {
                    identifier("enum value", v.name(), &name)?;
                }
            }
            todo.extend(&m.nested_type);
        }
    }
    if types > limits.max_types {
        return Err(SchemaError::TooLarge(format!(
            "descriptor_set declares {types} messages and enums, at most {} allowed",
            limits.max_types
        )));
    }
    if fields > limits.max_fields {
        return Err(SchemaError::TooLarge(format!(
            "descriptor_set declares {fields} fields and enum values, at most {} allowed",
            limits.max_fields
        )));
    }
    no_import_cycle(&set.file)
}

/// protoc refuses a file that imports itself, directly or through others.
fn no_import_cycle(files: &[FileDescriptorProto]) -> Result<(), SchemaError> {
    let index: HashMap<&str, usize> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.name(), i))
        .collect();
    // 0: not visited, 1: on the current path, 2: done.
    let mut state = vec![0u8; files.len()];
    for start in 0..files.len() {
        if state[start] != 0 {
            continue;
        }
        // An explicit stack of (file, next dependency to look at).
        let mut stack = vec![(start, 0usize)];
        state[start] = 1;
        while let Some(top) = stack.last_mut() {
            let file = top.0;
            let dependency = files[file].dependency.get(top.1);
            top.1 += 1;
            match dependency.and_then(|d| index.get(d.as_str()).map(|&i| (d, i))) {
                Some((name, i)) if state[i] == 1 => {
                    return Err(invalid(format!(
                        "import cycle: file {} imports {}, which imports it back",
                        quoted(files[file].name()),
                        quoted(name)
                    )));
                }
                Some((_, i)) if state[i] == 0 => {
                    state[i] = 1;
                    stack.push((i, 0));
                }
                Some(_) => {}
                None if dependency.is_some() => {} // not in the set: the pool says so
                None => {
                    state[file] = 2;
                    stack.pop();
                }
            }
        }
    }
    Ok(())
}

fn scalar_key(kind: &Kind) -> bool {
    !matches!(
        kind,
        Kind::Double | Kind::Float | Kind::Bytes | Kind::Message(_) | Kind::Enum(_)
    )
}

/// The checks that need names resolved: map entries, and a field's declared type
/// against what its type name names.
pub(crate) fn after_pool(
    set: &FileDescriptorSet,
    pool: &DescriptorPool,
) -> Result<(), SchemaError> {
    for message in pool.all_messages().filter(MessageDescriptor::is_map_entry) {
        map_entry(&message)?;
    }
    for message in pool.all_messages() {
        for field in message.fields() {
            if let Kind::Message(entry) = field.kind()
                && entry.is_map_entry()
            {
                if field.cardinality() != Cardinality::Repeated {
                    return Err(invalid(format!(
                        "field {} is not repeated but its type {} is a map entry",
                        field.full_name(),
                        entry.full_name()
                    )));
                }
                if entry.parent_message().as_ref() != Some(&message) {
                    return Err(invalid(format!(
                        "field {} uses map entry {}, which is not nested in {}",
                        field.full_name(),
                        entry.full_name(),
                        message.full_name()
                    )));
                }
            }
        }
    }
    // The pool resolves a type name to whatever it names; protoc also holds it to the
    // field's declared type.
    for file in &set.file {
        let mut todo: Vec<(String, &DescriptorProto)> = file
            .message_type
            .iter()
            .map(|m| (qualify(file.package(), m.name()), m))
            .collect();
        while let Some((full, m)) = todo.pop() {
            if let Some(resolved) = pool.get_message_by_name(&full) {
                for f in &m.field {
                    let Some(declared) = f.r#type.and_then(|t| Type::try_from(t).ok()) else {
                        continue;
                    };
                    let Some(kind) = resolved.get_field(f.number() as u32).map(|x| x.kind()) else {
                        continue;
                    };
                    let fits = match declared {
                        Type::Message | Type::Group => matches!(kind, Kind::Message(_)),
                        Type::Enum => matches!(kind, Kind::Enum(_)),
                        _ => true,
                    };
                    if !fits {
                        return Err(invalid(format!(
                            "field {full}.{} is declared {} but its type name {} names {}",
                            f.name(),
                            declared
                                .as_str_name()
                                .trim_start_matches("TYPE_")
                                .to_lowercase(),
                            quoted(f.type_name()),
                            match kind {
                                Kind::Enum(_) => "an enum",
                                _ => "a message",
                            }
                        )));
                    }
                }
            }
            todo.extend(
                m.nested_type
                    .iter()
                    .map(|n| (format!("{full}.{}", n.name()), n)),
            );
        }
    }
    Ok(())
}

fn qualify(package: &str, name: &str) -> String {
    if package.is_empty() {
        name.to_owned()
    } else {
        format!("{package}.{name}")
    }
}

fn map_entry(entry: &MessageDescriptor) -> Result<(), SchemaError> {
    let name = entry.full_name();
    let proto = entry.descriptor_proto();
    if !proto.nested_type.is_empty()
        || !proto.enum_type.is_empty()
        || !proto.oneof_decl.is_empty()
        || !proto.extension_range.is_empty()
    {
        return Err(invalid(format!(
            "map entry {name} declares nested types, oneofs or extensions"
        )));
    }
    let key = entry.get_field(1).filter(|f| f.name() == "key");
    let value = entry.get_field(2).filter(|f| f.name() == "value");
    let (Some(key), Some(_value)) = (key, value) else {
        return Err(invalid(format!(
            "map entry {name} must have exactly a field key = 1 and a field value = 2"
        )));
    };
    if entry.fields().len() != 2
        || entry
            .fields()
            .any(|f| f.cardinality() == Cardinality::Repeated)
    {
        return Err(invalid(format!(
            "map entry {name} must have exactly a field key = 1 and a field value = 2, neither repeated"
        )));
    }
    if !scalar_key(&key.kind()) {
        return Err(invalid(format!(
            "map entry {name} has a key of type {}; a map key must be an integer, bool or string",
            kind_name(&key.kind())
        )));
    }
    Ok(())
}
