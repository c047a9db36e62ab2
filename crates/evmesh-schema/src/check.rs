//! The compatibility checker: every difference between two versions of a schema
//! over the types reachable from the payload message, each with what it needs.

use std::collections::HashSet;
use std::fmt;

use prost_reflect::{Cardinality, EnumDescriptor, FieldDescriptor, Kind, MessageDescriptor};
use prost_types::descriptor_proto::ReservedRange;
use prost_types::enum_descriptor_proto::EnumReservedRange;

use crate::Schema;

/// How big a version step a change needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bump {
    None,
    Patch,
    Minor,
    Major,
}

impl fmt::Display for Bump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Bump::None => "NONE",
            Bump::Patch => "PATCH",
            Bump::Minor => "MINOR",
            Bump::Major => "MAJOR",
        })
    }
}

/// One difference between two versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Stable rule name, e.g. `FIELD_SAME_TYPE`.
    pub rule: &'static str,
    /// Where: `shop.v1.OrderPlaced.total_cents`.
    pub path: String,
    pub message: String,
    pub needs: Bump,
}

/// Every change, and the bump the whole step needs (the largest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub needs: Bump,
    pub changes: Vec<Change>,
}

/// Compares `old` to `new` over every type reachable from the payload message.
pub fn compare(old: &Schema, new: &Schema) -> Verdict {
    let mut checker = Checker::default();
    let (o, n) = (old.message(), new.message());
    if o.full_name() != n.full_name() {
        checker.add(
            Bump::Major,
            "MESSAGE_SAME_NAME",
            o.full_name(),
            format!(
                "payload message renamed or moved from {} to {}",
                o.full_name(),
                n.full_name()
            ),
        );
    }
    checker.message(o, n);
    for added in new
        .pool()
        .all_messages()
        .filter(|m| old.pool().get_message_by_name(m.full_name()).is_none())
    {
        if !added.is_map_entry() {
            checker.add(
                Bump::Minor,
                "MESSAGE_ADDED",
                added.full_name(),
                format!("message {} added", added.full_name()),
            );
        }
    }
    for added in new
        .pool()
        .all_enums()
        .filter(|e| old.pool().get_enum_by_name(e.full_name()).is_none())
    {
        checker.add(
            Bump::Minor,
            "ENUM_ADDED",
            added.full_name(),
            format!("enum {} added", added.full_name()),
        );
    }
    if checker.changes.is_empty() && old.encoded() != new.encoded() {
        checker.add(
            Bump::Patch,
            "DESCRIPTOR_CHANGED",
            o.full_name(),
            "comments, options, declaration order or file layout changed; nothing on the wire or in JSON".into(),
        );
    }
    let needs = checker
        .changes
        .iter()
        .map(|c| c.needs)
        .max()
        .unwrap_or(Bump::None);
    Verdict {
        needs,
        changes: checker.changes,
    }
}

#[derive(Default)]
struct Checker {
    changes: Vec<Change>,
    seen: HashSet<(String, String)>,
}

fn kind_name(kind: &Kind) -> String {
    match kind {
        Kind::Message(m) => m.full_name().to_owned(),
        Kind::Enum(e) => e.full_name().to_owned(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn cardinality(f: &FieldDescriptor) -> &'static str {
    if f.is_map() {
        "map"
    } else if f.is_list() {
        "repeated"
    } else if f.cardinality() == Cardinality::Required {
        "required"
    } else {
        "singular"
    }
}

fn real_oneof(f: &FieldDescriptor) -> Option<String> {
    f.containing_oneof()
        .filter(|o| !o.is_synthetic())
        .map(|o| o.name().to_owned())
}

fn in_ranges(n: i32, ranges: &[(i32, i32)]) -> bool {
    ranges.iter().any(|&(start, end)| n >= start && n < end)
}

fn message_reserved(m: &MessageDescriptor) -> Vec<(i32, i32)> {
    m.descriptor_proto()
        .reserved_range
        .iter()
        .map(|r: &ReservedRange| (r.start(), r.end()))
        .collect()
}

fn enum_reserved(e: &EnumDescriptor) -> Vec<(i32, i32)> {
    // Enum reserved ranges are inclusive; make them half-open like messages'.
    e.enum_descriptor_proto()
        .reserved_range
        .iter()
        .map(|r: &EnumReservedRange| (r.start(), r.end().saturating_add(1)))
        .collect()
}

fn ranges_kept(old: &[(i32, i32)], new: &[(i32, i32)]) -> Vec<(i32, i32)> {
    old.iter()
        .filter(|&&(start, end)| !new.iter().any(|&(s, e)| s <= start && end <= e))
        .copied()
        .collect()
}

impl Checker {
    fn add(&mut self, needs: Bump, rule: &'static str, path: &str, message: String) {
        self.changes.push(Change {
            rule,
            path: path.to_owned(),
            message,
            needs,
        });
    }

    fn message(&mut self, o: &MessageDescriptor, n: &MessageDescriptor) {
        if !self
            .seen
            .insert((o.full_name().to_owned(), n.full_name().to_owned()))
        {
            return;
        }
        let base = o.full_name();
        if o.descriptor_proto()
            .options
            .as_ref()
            .and_then(|x| x.message_set_wire_format)
            != n.descriptor_proto()
                .options
                .as_ref()
                .and_then(|x| x.message_set_wire_format)
        {
            self.add(
                Bump::Major,
                "MESSAGE_SAME_MESSAGE_SET_WIRE_FORMAT",
                base,
                "message_set_wire_format changed".into(),
            );
        }
        for fo in o.fields() {
            let path = format!("{base}.{}", fo.name());
            match n.get_field(fo.number()) {
                None => self.add(
                    Bump::Major,
                    "FIELD_NO_DELETE",
                    &path,
                    format!(
                        "field {} = {} was deleted; old data and JSON still carry it",
                        fo.name(),
                        fo.number()
                    ),
                ),
                Some(fn_) => self.field(&path, &fo, &fn_),
            }
        }
        let reserved = message_reserved(o);
        for fn_ in n.fields().filter(|f| o.get_field(f.number()).is_none()) {
            let path = format!("{base}.{}", fn_.name());
            if in_ranges(fn_.number() as i32, &reserved)
                || o.descriptor_proto()
                    .reserved_name
                    .iter()
                    .any(|r| r == fn_.name())
            {
                self.add(
                    Bump::Major,
                    "FIELD_NO_REUSE_RESERVED",
                    &path,
                    format!(
                        "field {} = {} reuses a reserved name or number",
                        fn_.name(),
                        fn_.number()
                    ),
                );
            } else if let Some(old) = o.get_field_by_name(fn_.name()) {
                self.add(
                    Bump::Major,
                    "FIELD_SAME_NUMBER",
                    &path,
                    format!(
                        "field {} moved from number {} to {}",
                        fn_.name(),
                        old.number(),
                        fn_.number()
                    ),
                );
            } else if fn_.cardinality() == Cardinality::Required {
                self.add(
                    Bump::Major,
                    "FIELD_NEW_REQUIRED",
                    &path,
                    format!(
                        "new field {} is required; data from older writers lacks it",
                        fn_.name()
                    ),
                );
            } else {
                self.add(
                    Bump::Minor,
                    "FIELD_ADDED",
                    &path,
                    format!("field {} = {} added", fn_.name(), fn_.number()),
                );
            }
        }
        let lost = ranges_kept(&reserved, &message_reserved(n));
        let lost_names: Vec<&String> = o
            .descriptor_proto()
            .reserved_name
            .iter()
            .filter(|name| !n.descriptor_proto().reserved_name.contains(name))
            .collect();
        if !lost.is_empty() || !lost_names.is_empty() {
            self.add(
                Bump::Major,
                "RESERVED_MESSAGE_NO_DELETE",
                base,
                format!("reserved numbers {lost:?} or names {lost_names:?} are no longer reserved"),
            );
        }
        for oneof in o.oneofs().filter(|x| !x.is_synthetic()) {
            if !n
                .oneofs()
                .any(|x| !x.is_synthetic() && x.name() == oneof.name())
            {
                self.add(
                    Bump::Major,
                    "ONEOF_NO_DELETE",
                    &format!("{base}.{}", oneof.name()),
                    format!("oneof {} was deleted", oneof.name()),
                );
            }
        }
    }

    fn field(&mut self, path: &str, o: &FieldDescriptor, n: &FieldDescriptor) {
        if o.name() != n.name() {
            self.add(
                Bump::Major,
                "FIELD_SAME_NAME",
                path,
                format!(
                    "field {} = {} renamed to {}; JSON uses the name",
                    o.name(),
                    o.number(),
                    n.name()
                ),
            );
        }
        if o.json_name() != n.json_name() {
            self.add(
                Bump::Major,
                "FIELD_SAME_JSON_NAME",
                path,
                format!(
                    "json_name changed from {} to {}",
                    o.json_name(),
                    n.json_name()
                ),
            );
        }
        let (oo, no) = (real_oneof(o), real_oneof(n));
        if cardinality(o) != cardinality(n) {
            self.add(
                Bump::Major,
                "FIELD_SAME_CARDINALITY",
                path,
                format!(
                    "cardinality changed from {} to {}",
                    cardinality(o),
                    cardinality(n)
                ),
            );
        } else if oo == no
            && kind_name(&o.kind()) == kind_name(&n.kind())
            && !o.is_list()
            && !o.is_map()
            && o.supports_presence() != n.supports_presence()
        {
            // Moving into or out of a oneof, or to a message type, changes presence too;
            // that is reported as the move or the type change.
            let presence = |f: &FieldDescriptor| {
                if f.supports_presence() {
                    "explicit"
                } else {
                    "implicit"
                }
            };
            self.add(
                Bump::Major,
                "FIELD_SAME_PRESENCE",
                path,
                format!("presence changed from {} to {}", presence(o), presence(n)),
            );
        }
        if oo != no {
            let show = |x: &Option<String>| {
                x.as_deref()
                    .map_or("no oneof".to_owned(), |x| format!("oneof {x}"))
            };
            self.add(
                Bump::Major,
                "FIELD_SAME_ONEOF",
                path,
                format!("field moved from {} to {}", show(&oo), show(&no)),
            );
        }
        if o.is_group() != n.is_group() {
            self.add(
                Bump::Major,
                "FIELD_SAME_TYPE",
                path,
                "field changed between group and message".into(),
            );
        }
        let (od, nd) = (
            o.field_descriptor_proto().default_value.as_deref(),
            n.field_descriptor_proto().default_value.as_deref(),
        );
        if od != nd {
            self.add(
                Bump::Major,
                "FIELD_SAME_DEFAULT",
                path,
                format!("default changed from {od:?} to {nd:?}"),
            );
        }
        if o.is_map() && n.is_map() {
            if let (Kind::Message(om), Kind::Message(nm)) = (o.kind(), n.kind()) {
                for (side, number) in [("key", 1), ("value", 2)] {
                    if let (Some(of), Some(nf)) = (om.get_field(number), nm.get_field(number)) {
                        self.kind(&format!("{path}.{side}"), &of.kind(), &nf.kind());
                    }
                }
            }
        } else {
            self.kind(path, &o.kind(), &n.kind());
        }
    }

    fn kind(&mut self, path: &str, o: &Kind, n: &Kind) {
        match (o, n) {
            (Kind::Message(om), Kind::Message(nm)) if om.full_name() == nm.full_name() => {
                self.message(om, nm)
            }
            (Kind::Enum(oe), Kind::Enum(ne)) if oe.full_name() == ne.full_name() => {
                self.enumeration(oe, ne)
            }
            (o, n) if kind_name(o) == kind_name(n) => {}
            (o, n) => self.add(
                Bump::Major,
                "FIELD_SAME_TYPE",
                path,
                format!("type changed from {} to {}", kind_name(o), kind_name(n)),
            ),
        }
    }

    fn enumeration(&mut self, o: &EnumDescriptor, n: &EnumDescriptor) {
        if !self
            .seen
            .insert((o.full_name().to_owned(), n.full_name().to_owned()))
        {
            return;
        }
        let base = o.full_name();
        for vo in o.values() {
            let path = format!("{base}.{}", vo.name());
            match n.get_value(vo.number()) {
                None => self.add(
                    Bump::Major,
                    "ENUM_VALUE_NO_DELETE",
                    &path,
                    format!("enum value {} = {} was deleted", vo.name(), vo.number()),
                ),
                Some(vn) if vn.name() != vo.name() => self.add(
                    Bump::Major,
                    "ENUM_VALUE_SAME_NAME",
                    &path,
                    format!(
                        "enum value {} = {} renamed to {}; JSON uses the name",
                        vo.name(),
                        vo.number(),
                        vn.name()
                    ),
                ),
                Some(_) => {}
            }
        }
        for vn in n.values().filter(|v| o.get_value(v.number()).is_none()) {
            let path = format!("{base}.{}", vn.name());
            match o.get_value_by_name(vn.name()) {
                Some(old) => self.add(
                    Bump::Major,
                    "ENUM_VALUE_SAME_NUMBER",
                    &path,
                    format!(
                        "enum value {} renumbered from {} to {}",
                        vn.name(),
                        old.number(),
                        vn.number()
                    ),
                ),
                None if in_ranges(vn.number(), &enum_reserved(o))
                    || o.enum_descriptor_proto()
                        .reserved_name
                        .iter()
                        .any(|r| r == vn.name()) =>
                {
                    self.add(
                        Bump::Major,
                        "ENUM_VALUE_NO_REUSE_RESERVED",
                        &path,
                        format!(
                            "enum value {} = {} reuses a reserved name or number",
                            vn.name(),
                            vn.number()
                        ),
                    );
                }
                None => self.add(
                    Bump::Minor,
                    "ENUM_VALUE_ADDED",
                    &path,
                    format!("enum value {} = {} added", vn.name(), vn.number()),
                ),
            }
        }
        let lost = ranges_kept(&enum_reserved(o), &enum_reserved(n));
        let lost_names: Vec<&String> = o
            .enum_descriptor_proto()
            .reserved_name
            .iter()
            .filter(|name| !n.enum_descriptor_proto().reserved_name.contains(name))
            .collect();
        if !lost.is_empty() || !lost_names.is_empty() {
            self.add(
                Bump::Major,
                "RESERVED_ENUM_NO_DELETE",
                base,
                format!("reserved numbers {lost:?} or names {lost_names:?} are no longer reserved"),
            );
        }
    }
}
