//! `.proto` source from a compiled file: what a schema's files say, for people who
//! read a registered version (the console, `evmesh schema show --output proto`).
//!
//! Compiling the text again gives the same descriptor, comments aside (a stored
//! schema keeps none): the tests compile what this prints with protox and compare.

use std::fmt::Write;

use prost_reflect::{
    Cardinality, DynamicMessage, EnumDescriptor, FieldDescriptor, FileDescriptor, Kind,
    MessageDescriptor, ServiceDescriptor, Syntax, Value,
};
use prost_types::field_descriptor_proto::Type;

/// The `.proto` text of `file`.
pub fn proto_source(file: &FileDescriptor) -> String {
    let mut out = Printer::default();
    let proto = file.file_descriptor_proto();
    match proto.syntax() {
        "" | "proto2" => out.line("syntax = \"proto2\";"),
        other => out.line(&format!("syntax = {};", quote(other))),
    }
    if !file.package_name().is_empty() {
        out.blank();
        out.line(&format!("package {};", file.package_name()));
    }
    if !proto.dependency.is_empty() {
        out.blank();
        for (i, dependency) in proto.dependency.iter().enumerate() {
            let index = i32::try_from(i).unwrap_or(i32::MAX);
            let modifier = if proto.public_dependency.contains(&index) {
                "public "
            } else if proto.weak_dependency.contains(&index) {
                "weak "
            } else {
                ""
            };
            out.line(&format!("import {modifier}{};", quote(dependency)));
        }
    }
    let options = options(&file.options(), &[]);
    if !options.is_empty() {
        out.blank();
        for (name, value) in options {
            out.line(&format!("option {name} = {value};"));
        }
    }
    for message in file.messages() {
        out.blank();
        out.message(&message, file.syntax());
    }
    for enumeration in file.enums() {
        out.blank();
        out.enumeration(&enumeration);
    }
    for service in file.services() {
        out.blank();
        out.service(&service);
    }
    out.extensions(file.extensions(), file.syntax());
    out.text
}

#[derive(Default)]
struct Printer {
    text: String,
    depth: usize,
}

impl Printer {
    fn line(&mut self, s: &str) {
        for _ in 0..self.depth {
            self.text.push_str("  ");
        }
        self.text.push_str(s);
        self.text.push('\n');
    }

    fn blank(&mut self) {
        if !self.text.is_empty() && !self.text.ends_with("{\n") && !self.text.ends_with("\n\n") {
            self.text.push('\n');
        }
    }

    fn open(&mut self, s: &str) {
        self.line(&format!("{s} {{"));
        self.depth += 1;
    }

    fn close(&mut self) {
        self.depth -= 1;
        self.line("}");
    }

    fn message(&mut self, m: &MessageDescriptor, syntax: Syntax) {
        self.open(&format!("message {}", m.name()));
        // map_entry marks the synthetic entry messages of maps, which stay unwritten.
        for (name, value) in options(&m.options(), &["map_entry"]) {
            self.line(&format!("option {name} = {value};"));
        }
        let proto = m.descriptor_proto();
        let mut printed_oneofs = Vec::new();
        for field in m.fields() {
            match field.containing_oneof().filter(|o| !o.is_synthetic()) {
                Some(oneof) => {
                    if printed_oneofs.contains(&oneof.name().to_owned()) {
                        continue;
                    }
                    printed_oneofs.push(oneof.name().to_owned());
                    self.open(&format!("oneof {}", oneof.name()));
                    for (name, value) in options(&oneof.options(), &[]) {
                        self.line(&format!("option {name} = {value};"));
                    }
                    for member in oneof.fields() {
                        self.field(&member, syntax, false);
                    }
                    self.close();
                }
                None => self.field(&field, syntax, true),
            }
        }
        for range in &proto.extension_range {
            let end = range.end.unwrap_or(0).saturating_sub(1);
            let end = if end >= 536_870_911 {
                "max".to_owned()
            } else {
                end.to_string()
            };
            self.line(&format!(
                "extensions {} to {end};",
                range.start.unwrap_or(0)
            ));
        }
        if !proto.reserved_range.is_empty() {
            let ranges: Vec<String> = proto
                .reserved_range
                .iter()
                .map(|r| range(r.start(), r.end().saturating_sub(1), 536_870_911))
                .collect();
            self.line(&format!("reserved {};", ranges.join(", ")));
        }
        if !proto.reserved_name.is_empty() {
            let names: Vec<String> = proto.reserved_name.iter().map(|n| quote(n)).collect();
            self.line(&format!("reserved {};", names.join(", ")));
        }
        for nested in m.child_messages().filter(|n| !n.is_map_entry()) {
            self.blank();
            self.message(&nested, syntax);
        }
        for nested in m.child_enums() {
            self.blank();
            self.enumeration(&nested);
        }
        self.extensions(m.child_extensions(), syntax);
        self.close();
    }

    /// One field; `labelled`: outside a oneof, where it carries its cardinality.
    fn field(&mut self, field: &FieldDescriptor, syntax: Syntax, labelled: bool) {
        let proto = field.field_descriptor_proto();
        let scope = field.parent_message().full_name();
        let ty = if field.is_map() {
            let Kind::Message(entry) = field.kind() else {
                unreachable!("a map field's kind is its entry message")
            };
            format!(
                "map<{}, {}>",
                type_name(&entry.map_entry_key_field(), scope),
                type_name(&entry.map_entry_value_field(), scope)
            )
        } else {
            let label = if !labelled {
                ""
            } else if field.cardinality() == Cardinality::Repeated {
                "repeated "
            } else if proto.proto3_optional() {
                "optional "
            } else if syntax == Syntax::Proto2 {
                match field.cardinality() {
                    Cardinality::Required => "required ",
                    _ => "optional ",
                }
            } else {
                ""
            };
            format!("{label}{}", type_name(field, scope))
        };
        let mut inline = Vec::new();
        if let Some(default) = &proto.default_value {
            let value = match proto.r#type() {
                Type::String | Type::Bytes => quote(default),
                _ => default.clone(),
            };
            inline.push(format!("default = {value}"));
        }
        if proto
            .json_name
            .as_deref()
            .is_some_and(|j| j != camel(field.name()))
        {
            inline.push(format!("json_name = {}", quote(proto.json_name())));
        }
        for (name, value) in options(&field.options(), &[]) {
            inline.push(format!("{name} = {value}"));
        }
        let inline = if inline.is_empty() {
            String::new()
        } else {
            format!(" [{}]", inline.join(", "))
        };
        self.line(&format!(
            "{ty} {} = {}{inline};",
            field.name(),
            field.number()
        ));
    }

    fn enumeration(&mut self, e: &EnumDescriptor) {
        self.open(&format!("enum {}", e.name()));
        for (name, value) in options(&e.options(), &[]) {
            self.line(&format!("option {name} = {value};"));
        }
        // In declaration order: an alias shares its number with another value.
        for proto in &e.enum_descriptor_proto().value {
            let Some(v) = e.get_value_by_name(proto.name()) else {
                continue;
            };
            let inline: Vec<String> = options(&v.options(), &[])
                .into_iter()
                .map(|(name, value)| format!("{name} = {value}"))
                .collect();
            let inline = if inline.is_empty() {
                String::new()
            } else {
                format!(" [{}]", inline.join(", "))
            };
            self.line(&format!("{} = {}{inline};", v.name(), v.number()));
        }
        let proto = e.enum_descriptor_proto();
        if !proto.reserved_range.is_empty() {
            // Enum reserved ranges are inclusive.
            let ranges: Vec<String> = proto
                .reserved_range
                .iter()
                .map(|r| range(r.start(), r.end(), i32::MAX))
                .collect();
            self.line(&format!("reserved {};", ranges.join(", ")));
        }
        if !proto.reserved_name.is_empty() {
            let names: Vec<String> = proto.reserved_name.iter().map(|n| quote(n)).collect();
            self.line(&format!("reserved {};", names.join(", ")));
        }
        self.close();
    }

    fn service(&mut self, s: &ServiceDescriptor) {
        self.open(&format!("service {}", s.name()));
        for (name, value) in options(&s.options(), &[]) {
            self.line(&format!("option {name} = {value};"));
        }
        for m in s.methods() {
            let stream = |yes: bool| if yes { "stream " } else { "" };
            let name = |full: &str| relative(s.parent_pool(), s.package_name(), full);
            let signature = format!(
                "rpc {}({}{}) returns ({}{})",
                m.name(),
                stream(m.is_client_streaming()),
                name(m.input().full_name()),
                stream(m.is_server_streaming()),
                name(m.output().full_name())
            );
            let options = options(&m.options(), &[]);
            if options.is_empty() {
                self.line(&format!("{signature};"));
            } else {
                self.open(&signature);
                for (name, value) in options {
                    self.line(&format!("option {name} = {value};"));
                }
                self.close();
            }
        }
        self.close();
    }

    /// Extension fields, one `extend` block per extended message.
    fn extensions(
        &mut self,
        extensions: impl Iterator<Item = prost_reflect::ExtensionDescriptor>,
        syntax: Syntax,
    ) {
        let mut by_extendee: Vec<(String, Vec<prost_reflect::ExtensionDescriptor>)> = Vec::new();
        for e in extensions {
            let extendee = e.containing_message().full_name().to_owned();
            match by_extendee.iter_mut().find(|(name, _)| *name == extendee) {
                Some((_, list)) => list.push(e),
                None => by_extendee.push((extendee, vec![e])),
            }
        }
        for (extendee, list) in by_extendee {
            self.blank();
            let scope = list[0].parent_message().map_or_else(
                || list[0].package_name().to_owned(),
                |m| m.full_name().to_owned(),
            );
            let pool = list[0].parent_pool().clone();
            self.open(&format!("extend {}", relative(&pool, &scope, &extendee)));
            for e in list {
                let proto = e.field_descriptor_proto();
                let label = match e.cardinality() {
                    Cardinality::Repeated => "repeated ",
                    _ if proto.proto3_optional() => "optional ",
                    Cardinality::Required => "required ",
                    _ if syntax == Syntax::Proto2 => "optional ",
                    _ => "",
                };
                let ty = match e.kind() {
                    Kind::Message(m) => relative(&pool, &scope, m.full_name()),
                    Kind::Enum(en) => relative(&pool, &scope, en.full_name()),
                    other => scalar(&other).to_owned(),
                };
                self.line(&format!("{label}{ty} {} = {};", e.name(), e.number()));
            }
            self.close();
        }
    }
}

/// `start`, or `start to end`; `end` at `max` is written `max`.
fn range(start: i32, end: i32, max: i32) -> String {
    if start == end {
        start.to_string()
    } else if end >= max {
        format!("{start} to max")
    } else {
        format!("{start} to {end}")
    }
}

/// A field's type as its scope can name it.
fn type_name(field: &FieldDescriptor, scope: &str) -> String {
    match field.kind() {
        Kind::Message(m) => relative(field.parent_pool(), scope, m.full_name()),
        Kind::Enum(e) => relative(field.parent_pool(), scope, e.full_name()),
        other => scalar(&other).to_owned(),
    }
}

/// The shortest name for `full` that resolves to it from `scope` by the language's
/// rule (the first part is looked up from the innermost scope out, and the first
/// scope that defines it wins); the fully qualified `.full` when none does.
fn relative(pool: &prost_reflect::DescriptorPool, scope: &str, full: &str) -> String {
    let parts: Vec<&str> = full.split('.').collect();
    // Within the type's package, or from its root: never from the middle of a package
    // (`v1.Status`), which resolves but reads oddly.
    let package = pool
        .get_message_by_name(full)
        .map(|m| m.package_name().to_owned())
        .or_else(|| {
            pool.get_enum_by_name(full)
                .map(|e| e.package_name().to_owned())
        })
        .unwrap_or_default();
    let package_parts = if package.is_empty() {
        0
    } else {
        package.split('.').count()
    };
    for k in (0..parts.len())
        .rev()
        .filter(|&k| k == 0 || k >= package_parts)
    {
        let candidate = parts[k..].join(".");
        if resolves(pool, scope, &candidate).as_deref() == Some(full) {
            return candidate;
        }
    }
    format!(".{full}")
}

fn resolves(pool: &prost_reflect::DescriptorPool, scope: &str, name: &str) -> Option<String> {
    let first = name.split('.').next()?;
    let mut scope = scope.to_owned();
    loop {
        let candidate = if scope.is_empty() {
            first.to_owned()
        } else {
            format!("{scope}.{first}")
        };
        if defines(pool, &candidate) {
            let rest = &name[first.len()..];
            return Some(format!("{candidate}{rest}"));
        }
        if scope.is_empty() {
            return None;
        }
        scope = scope
            .rsplit_once('.')
            .map_or(String::new(), |(s, _)| s.to_owned());
    }
}

/// Whether `name` is a symbol: a message, enum, service, extension, field or
/// package (or a package's prefix).
fn defines(pool: &prost_reflect::DescriptorPool, name: &str) -> bool {
    pool.get_message_by_name(name).is_some()
        || pool.get_enum_by_name(name).is_some()
        || pool.get_service_by_name(name).is_some()
        || pool.get_extension_by_name(name).is_some()
        || name.rsplit_once('.').is_some_and(|(parent, field)| {
            pool.get_message_by_name(parent).is_some_and(|m| {
                m.get_field_by_name(field).is_some() || m.oneofs().any(|o| o.name() == field)
            }) || pool
                .get_enum_by_name(parent)
                .is_some_and(|e| e.get_value_by_name(field).is_some())
        })
        || pool.files().any(|f| {
            let package = f.package_name();
            package == name || package.starts_with(&format!("{name}."))
        })
}

fn scalar(kind: &Kind) -> &'static str {
    match kind {
        Kind::Double => "double",
        Kind::Float => "float",
        Kind::Int32 => "int32",
        Kind::Int64 => "int64",
        Kind::Uint32 => "uint32",
        Kind::Uint64 => "uint64",
        Kind::Sint32 => "sint32",
        Kind::Sint64 => "sint64",
        Kind::Fixed32 => "fixed32",
        Kind::Fixed64 => "fixed64",
        Kind::Sfixed32 => "sfixed32",
        Kind::Sfixed64 => "sfixed64",
        Kind::Bool => "bool",
        Kind::String => "string",
        Kind::Bytes => "bytes",
        Kind::Message(_) | Kind::Enum(_) => "",
    }
}

/// protoc's default JSON name: lowerCamelCase of the field's name.
fn camel(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// The options set in `message` as (name, value) pairs, extensions as
/// `(full.name)`, one pair per element of a repeated option.
fn options(message: &DynamicMessage, skip: &[&str]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (field, value) in message.fields() {
        if skip.contains(&field.name()) || field.name() == "features" {
            continue;
        }
        push_option(&mut out, field.name().to_owned(), &field.kind(), value);
    }
    for (extension, value) in message.extensions() {
        push_option(
            &mut out,
            format!("({})", extension.full_name()),
            &extension.kind(),
            value,
        );
    }
    out
}

fn push_option(out: &mut Vec<(String, String)>, name: String, kind: &Kind, value: &Value) {
    match value {
        Value::List(items) => {
            for item in items {
                out.push((name.clone(), literal(kind, item)));
            }
        }
        single => out.push((name, literal(kind, single))),
    }
}

/// A value as the `.proto` text format writes it.
fn literal(kind: &Kind, value: &Value) -> String {
    match value {
        Value::Bool(b) => b.to_string(),
        Value::I32(n) => n.to_string(),
        Value::I64(n) => n.to_string(),
        Value::U32(n) => n.to_string(),
        Value::U64(n) => n.to_string(),
        Value::F32(n) => float(f64::from(*n)),
        Value::F64(n) => float(*n),
        Value::String(s) => quote(s),
        Value::Bytes(b) => quote_bytes(b),
        Value::EnumNumber(n) => match kind {
            Kind::Enum(e) => e
                .get_value(*n)
                .map_or_else(|| n.to_string(), |v| v.name().to_owned()),
            _ => n.to_string(),
        },
        Value::Message(m) => {
            let mut fields = Vec::new();
            for (field, value) in m.fields() {
                match value {
                    Value::List(items) => {
                        for item in items {
                            fields.push(format!(
                                "{}: {}",
                                field.name(),
                                literal(&field.kind(), item)
                            ));
                        }
                    }
                    single => fields.push(format!(
                        "{}: {}",
                        field.name(),
                        literal(&field.kind(), single)
                    )),
                }
            }
            for (extension, value) in m.extensions() {
                fields.push(format!(
                    "[{}]: {}",
                    extension.full_name(),
                    literal(&extension.kind(), value)
                ));
            }
            format!("{{ {} }}", fields.join(" "))
        }
        Value::List(items) => {
            let items: Vec<String> = items.iter().map(|i| literal(kind, i)).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Map(_) => "{}".to_owned(),
    }
}

fn float(n: f64) -> String {
    if n.is_nan() {
        "nan".to_owned()
    } else if n.is_infinite() {
        if n > 0.0 { "inf" } else { "-inf" }.to_owned()
    } else {
        let s = n.to_string();
        if s.contains(['.', 'e', 'E']) {
            s
        } else {
            format!("{s}.0")
        }
    }
}

/// A double-quoted string with `.proto` escapes.
fn quote(s: &str) -> String {
    quote_bytes(s.as_bytes())
}

fn quote_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('"');
    let mut rest = bytes;
    while !rest.is_empty() {
        // Valid UTF-8 is kept as it is, but for quotes, backslashes and controls.
        let (text, bad) = match std::str::from_utf8(rest) {
            Ok(text) => (text, 0),
            Err(e) => (
                std::str::from_utf8(&rest[..e.valid_up_to()]).unwrap_or_default(),
                e.error_len().unwrap_or(rest.len() - e.valid_up_to()),
            ),
        };
        for c in text.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        let _ = write!(out, "\\{b:03o}");
                    }
                }
                c => out.push(c),
            }
        }
        let used = text.len();
        for b in &rest[used..used + bad] {
            let _ = write!(out, "\\{b:03o}");
        }
        rest = &rest[used + bad..];
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    const GNARLY: &str = r#"
syntax = "proto3";

package shop.v1;

import "google/protobuf/timestamp.proto";
import "google/protobuf/descriptor.proto";

option java_package = "com.example.shop";
option optimize_for = SPEED;

extend google.protobuf.MessageOptions {
  string event_type = 50051;
}

extend google.protobuf.FieldOptions {
  repeated string tags = 50052;
}

message OrderPlaced {
  option (event_type) = "shop.order.placed";
  option deprecated = true;

  string order_id = 1 [deprecated = true, (tags) = "a\"b", (tags) = "c\\d\n"];
  repeated int64 line_cents = 2 [packed = false];
  map<string, Line> lines = 3;
  optional string coupon = 4;
  oneof payment {
    string card = 5;
    Wallet wallet = 6;
  }
  google.protobuf.Timestamp at = 7 [json_name = "placedAt"];
  Status status = 8;
  bytes raw = 9;
  double total = 10;
  sint32 s = 11;
  fixed64 f = 12;
  reserved 20, 22 to 25, 100 to max;
  reserved "old", "older";

  message Line {
    string sku = 1;
    uint32 quantity = 2;
    enum Unit {
      UNIT_UNSPECIFIED = 0;
      UNIT_KG = 1;
    }
    Unit unit = 3;
  }

  message Wallet {
    string id = 1;
    message Status {
      bool ok = 1;
    }
    Status own = 2;
    .shop.v1.Status order = 3;
  }
}

enum Status {
  option allow_alias = true;
  STATUS_UNSPECIFIED = 0;
  STATUS_OPEN = 1;
  STATUS_STARTED = 1 [deprecated = true];
  reserved 5, 7 to 9;
  reserved "STATUS_GONE";
}

service Shop {
  rpc Place(OrderPlaced) returns (stream OrderPlaced);
  rpc Old(stream OrderPlaced) returns (OrderPlaced) {
    option deprecated = true;
  }
}
"#;

    const PROTO2: &str = r#"
syntax = "proto2";

package legacy;

message Old {
  required string id = 1;
  optional int32 n = 2 [default = -5];
  optional string s = 3 [default = "a\"b\001"];
  optional double d = 4 [default = inf];
  repeated Kind kinds = 5;
  optional Kind kind = 6 [default = KIND_B];
  extensions 100 to 199, 1000 to max;
}

enum Kind {
  KIND_A = 1;
  KIND_B = 2;
}

extend Old {
  optional string note = 100;
}
"#;

    fn compile(files: &[(&str, &str)]) -> protox::Compiler {
        let mut resolver = protox::file::ChainFileResolver::new();
        resolver.add(protox::file::GoogleFileResolver::new());
        let files_owned: Vec<(String, String)> = files
            .iter()
            .map(|(n, s)| ((*n).to_owned(), (*s).to_owned()))
            .collect();
        resolver.add(InMemory(files_owned));
        let mut compiler = protox::Compiler::with_file_resolver(resolver);
        compiler.include_imports(true);
        for (name, _) in files {
            compiler
                .open_file(name)
                .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        }
        compiler
    }

    /// The file as people wrote it, extension options included (a decoded
    /// `FileDescriptorSet` drops them).
    fn printed(compiler: &protox::Compiler, name: &str) -> String {
        let pool = compiler.descriptor_pool();
        proto_source(&pool.get_file_by_name(name).expect("the file"))
    }

    struct InMemory(Vec<(String, String)>);

    impl protox::file::FileResolver for InMemory {
        fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
            match self.0.iter().find(|(n, _)| n == name) {
                Some((n, source)) => protox::file::File::from_source(n, source),
                None => Err(protox::Error::file_not_found(name)),
            }
        }
    }

    /// What compiling gives, without what the text cannot carry (positions).
    fn bare(set: &prost_types::FileDescriptorSet, name: &str) -> prost_types::FileDescriptorProto {
        let mut file = set
            .file
            .iter()
            .find(|f| f.name() == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} is not in the set"));
        file.source_code_info = None;
        file
    }

    fn round_trip(name: &str, source: &str) {
        let compiler = compile(&[(name, source)]);
        let printed = printed(&compiler, name);
        let again = compile(&[(name, &printed)]);
        let (before, after) = (
            compiler.encode_file_descriptor_set(),
            again.encode_file_descriptor_set(),
        );
        let decode =
            |bytes: &[u8]| prost_types::FileDescriptorSet::decode(bytes).expect("a descriptor set");
        assert_eq!(
            bare(&decode(&before), name),
            bare(&decode(&after), name),
            "printing {name} changed its descriptor; it printed:\n{printed}"
        );
    }

    #[test]
    fn proto3_with_every_construct_compiles_back_to_itself() {
        round_trip("shop/v1/order.proto", GNARLY);
    }

    #[test]
    fn proto2_with_defaults_and_extensions_compiles_back_to_itself() {
        round_trip("legacy/old.proto", PROTO2);
    }

    #[test]
    fn prints_what_people_wrote() {
        let printed = printed(
            &compile(&[("shop/v1/order.proto", GNARLY)]),
            "shop/v1/order.proto",
        );
        for expected in [
            "syntax = \"proto3\";",
            "package shop.v1;",
            "import \"google/protobuf/timestamp.proto\";",
            "  option (shop.v1.event_type) = \"shop.order.placed\";",
            "  map<string, Line> lines = 3;",
            "  google.protobuf.Timestamp at = 7 [json_name = \"placedAt\"];",
            "  Status status = 8;",
            "extend google.protobuf.MessageOptions {",
            "    shop.v1.Status order = 3;",
            "  optional string coupon = 4;",
            "  oneof payment {",
            "  reserved 20, 22 to 25, 100 to max;",
            "  rpc Place(OrderPlaced) returns (stream OrderPlaced);",
        ] {
            assert!(
                printed.contains(expected),
                "{expected:?} is missing from:\n{printed}"
            );
        }
    }

    #[test]
    fn quotes_escape_what_text_cannot_hold() {
        assert_eq!(quote("a\"b\\c\n"), r#""a\"b\\c\n""#);
        assert_eq!(quote_bytes(&[b'x', 0xff, 1]), r#""x\377\001""#);
        assert_eq!(quote("é"), "\"é\"");
    }
}
